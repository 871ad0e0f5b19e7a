"""The start-up pause of the garbage collector: off inside, frozen and back on after; a collector already off stays
off."""

import gc

from kdpipe.startup import collector_paused


def made_inside() -> list:
    return [[index] for index in range(1000)]  # 1001 objects the collector tracks


def test_the_collector_is_off_inside_then_on_and_what_was_made_is_frozen():
    gc.unfreeze()
    try:
        with collector_paused():
            assert not gc.isenabled()
            kept = made_inside()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(kept) + 1
        in_generations = {id(item) for item in gc.get_objects()}  # what collections walk: frozen objects are not
        assert id(kept) not in in_generations and id(kept[0]) not in in_generations
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
