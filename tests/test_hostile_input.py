"""Any bytes in, one line out (issue 16, point 5): job files of every hostile kind, manifests that lie and an image
that claims billions of pixels each give one line naming the file and what was expected, exit status 2, no
traceback, within 10 seconds, for `validate`, `run` and `submit` alike."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kdpipe.cli import main
from kdpipe.data.shards import MAX_PIXELS, BadImage, decode_image
from tests.test_bad_input import GOOD

SECONDS = 10


def job_text(**changes) -> str:
    job = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = job
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(key) if key.isdigit() else key] = value
    return yaml.safe_dump(job)


def laughs(levels: int = 9) -> str:
    """The 'billion laughs': each anchor a list of ten aliases of the one before, 10^9 values once expanded."""
    lines = ['l0: &l0 ["ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + job_text().replace("name: bad", f"name: bad\nlaugh: *l{levels}", 1)


JOB_FILES: dict[str, tuple[bytes, list[str]]] = {
    "latin-1 bytes": (job_text().replace("bad", "b\u00e9d").encode("latin-1"), ["byte", "not UTF-8"]),
    "utf-16": (job_text().encode("utf-16"), ["not UTF-8"]),
    "binary": (bytes(range(256)) * 64, ["not UTF-8"]),
    "nul bytes": (b"name: bad\x00\x00\x00\n", ["YAML"]),
    "deep nesting": (b"name: " + b"[" * 100_000, ["nested deeper than 64"]),
    "billion laughs": (laughs().encode(), ["more than 100000 values"]),
    "self-containing alias": (b"a: &a [1, *a]\n" + job_text().encode(), ["alias refers to a node that contains"]),
    "over a megabyte": (job_text().encode() + b"#" * (1 << 20), ["over 1048576 bytes"]),
    "a 5000-digit number": (job_text(seed=0).replace("seed: 0", "seed: " + "9" * 5000).encode(), ["number"]),
    "huge epochs": (job_text(stages__0__epochs=10**30).encode(), ["stages[0].epochs", "less than or equal"]),
    "huge batch": (job_text(data__batch_size=10**9).encode(), ["data.batch_size", "less than or equal"]),
    "huge images": (job_text(data__image_size=10**6).encode(), ["data.image_size", "less than or equal"]),
    "negative seed": (job_text(seed=-1).encode(), ["seed", "greater than or equal to 0"]),
    "nan lr": (
        job_text(stages__0__optimizer={"lr": 0.1}).replace("lr: 0.1", "lr: .nan").encode(),
        ["stages[0].optimizer.lr", "finite"],
    ),
    "infinite momentum": (
        job_text(stages__0__optimizer={"momentum": 0.5}).replace("momentum: 0.5", "momentum: .inf").encode(),
        ["stages[0].optimizer.momentum", "finite"],
    ),
    "overflowing float": (
        job_text(stages__0__optimizer={"lr": 0.1}).replace("lr: 0.1", "lr: 1.0e+400").encode(),
        ["stages[0].optimizer.lr", "finite"],
    ),
    "infinite temperature": (
        job_text(stages__1__params={"temperature": 4.0}).replace("temperature: 4.0", "temperature: .inf").encode(),
        ["stages[1].params.temperature", "finite"],
    ),
    "absurd lr": (job_text(stages__0__optimizer={"lr": 1e30}).encode(), ["stages[0].optimizer.lr", "less than"]),
    "milestone past the end": (
        job_text(stages__0__schedule={"name": "step", "milestones": [5]}).encode(),
        ["stages[0]", "milestones"],
    ),
    "a long string": (job_text(stages__0__model="r" * 100_000).encode(), ["stages[0].model", "at most 100"]),
    "not a mapping": (b"42\n", ["mapping"]),
}


def one_line_within_limit(argv: list[str], capsys, expected: list[str], name_in_line: str) -> None:
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith("error: ") and name_in_line in lines[0], lines[0]
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert len(lines[0]) < 600 and seconds < SECONDS, (len(lines[0]), seconds)


@pytest.mark.parametrize("kind", sorted(JOB_FILES))
@pytest.mark.parametrize("command", ["validate", "run", "submit"])
def test_a_hostile_job_file_gives_one_line(kind, command, tmp_path, capsys):
    content, expected = JOB_FILES[kind]
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    extra = ["--address", "http://127.0.0.1:9"] if command == "submit" else []  # refused before any contact
    one_line_within_limit([command, str(path), *extra], capsys, expected, str(path))


def lying_manifest(folder: Path, lie) -> Path:
    """A shard folder whose manifest.json says something untrue about itself."""
    shard = {"count": 1, "bytes": 10, "sha256": "0" * 64}
    splits = {split: {"count": 1, "shards": [{"name": f"{split}-000000.tar", **shard}]} for split in ("train", "val")}
    manifest = {"classes": ["a", "b"], "normalization": "imagenet", "splits": splits}
    lie(manifest)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


MANIFEST_LIES = {
    "absurd count": (
        lambda m: m["splits"]["train"]["shards"][0].update(count=10**18),
        "splits.train.shards[0].count",
    ),
    "count of the wrong type": (lambda m: m["splits"]["val"].update(count="many"), "splits.val.count"),
    "counts that do not add up": (lambda m: m["splits"]["train"].update(count=5), "not the sum"),
    "a shard outside the folder": (
        lambda m: m["splits"]["train"]["shards"][0].update(name="../../etc/passwd"),
        "splits.train.shards[0].name",
    ),
    "no classes": (lambda m: m.update(classes=[]), "classes"),
    "unknown normalization": (lambda m: m.update(normalization="made-up"), "normalization"),
    "not json": (lambda m: m.clear(), "manifest.json"),
}


@pytest.mark.parametrize("lie", sorted(MANIFEST_LIES))
@pytest.mark.parametrize("command", ["verify", "run"])
def test_a_manifest_that_lies_gives_one_line(lie, command, tmp_path, capsys):
    change, expected = MANIFEST_LIES[lie]
    folder = lying_manifest(tmp_path / "shards", change)
    if lie == "not json":
        (folder / "manifest.json").write_bytes(b"\xff{not json")
    if command == "verify":
        argv = ["data", "verify", str(folder)]
    else:
        job = yaml.safe_load(job_text())
        job["data"] = {"source": "shards", "path": str(folder)}
        job["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        argv = ["run", str(tmp_path / "job.yaml")]
    one_line_within_limit(argv, capsys, [expected], "manifest.json")


def png_claiming(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose header says `width` x `height`: a decompression bomb's calling card."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type and 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_an_image_claiming_billions_of_pixels_is_refused_before_decoding():
    started = time.monotonic()
    with pytest.raises(BadImage, match=r"more pixels than the \d+ allowed"):
        decode_image(png_claiming(100_000, 100_000))
    assert time.monotonic() - started < 1
    assert 100_000 * 100_000 > MAX_PIXELS
    assert decode_image(png_claiming(1, 1)).shape == (3, 1, 1)  # the same bytes, honest about their size


def test_verify_names_a_shard_with_an_enormous_image(tmp_path, capsys):
    """A training shard whose PNG claims 10^10 pixels: `kdpipe data verify` names it and the image, one line."""
    import webdataset as wds

    from kdpipe.data.shards import describe_shard

    folder = tmp_path / "shards"
    folder.mkdir()
    for split, image in (("train", png_claiming(100_000, 100_000)), ("val", png_claiming(1, 1))):
        with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
            sink.write({"__key__": "bomb", "png": image, "cls": b"0"})
    splits = {s: {"count": 1, "shards": [describe_shard(folder / f"{s}-000000.tar")]} for s in ("train", "val")}
    (folder / "manifest.json").write_text(json.dumps({"classes": ["a", "b"], "splits": splits}))
    one_line_within_limit(["data", "verify", str(folder)], capsys, ["bomb.png", "pixels"], "train-000000.tar")
