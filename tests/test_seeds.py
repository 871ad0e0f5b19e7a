"""Issue 17, point 1: a job repeated over seeds in one `kdpipe run`, each student learning from its own seed's
teacher, and `kdpipe report` over the repeats. The job is conftest's seeded pair, which test_lease runs with two
drivers at once: one worker per stage, so two stages train side by side on the session's 2 CPUs."""

from __future__ import annotations

import statistics

import torch
from safetensors.torch import load_file

from kdpipe.cli import main
from kdpipe.driver.report import REPORT
from kdpipe.models import load_weights
from kdpipe.tracking.store import Tracker
from kdpipe.tracking.tags import TAG_SEED, TAG_STAGE, TAG_TEACHER
from kdpipe.worker import artifacts
from tests.conftest import REPEATS
from tests.test_resume import stage_runs


def test_a_job_over_two_seeds_trains_each_student_from_its_own_seeds_teacher(two_drivers_over_seeds, capsys):
    """The seeded pair (conftest): four stage runs, each tagged with its seed, each student learning from its own
    seed's teacher (its probe), and `kdpipe report` over the two seeds."""
    path = two_drivers_over_seeds.path
    tracker = Tracker(two_drivers_over_seeds.tracking_uri)
    runs = {stage: stage_runs(tracker, stage)[0] for stage in REPEATS}
    assert {name: (run.data.tags[TAG_STAGE], run.data.tags[TAG_SEED]) for name, run in runs.items()} == {
        "teacher-s0": ("teacher-s0", "0"),
        "teacher-s1": ("teacher-s1", "1"),
        "student-s0": ("student-s0", "0"),
        "student-s1": ("student-s1", "1"),
    }
    # The two seeds give two different teachers; each student's probe holds its own seed's teacher's outputs.
    teachers = {}
    for seed in (0, 1):
        with tracker.artifacts(runs[f"teacher-s{seed}"].info.run_id).downloaded(artifacts.WEIGHTS) as folder:
            teachers[seed] = load_weights(folder).eval()
    for seed in (0, 1):
        student = runs[f"student-s{seed}"]
        assert student.data.tags[f"{TAG_TEACHER}.teacher-s{seed}"] == runs[f"teacher-s{seed}"].info.run_id
        probe = load_file(tracker.client.download_artifacts(student.info.run_id, "teachers/probe.safetensors"))
        with torch.no_grad():
            own, other = (teachers[s](probe["images"]) for s in (seed, 1 - seed))
        torch.testing.assert_close(probe[f"teacher-s{seed}"], own, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(probe[f"teacher-s{seed}"], other, atol=1e-3)

    capsys.readouterr()
    assert main(["report", str(path), "--markdown", str(path.parent / "report.md")]) == 0
    table = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 4}
    for stage in ("teacher", "student"):
        top1 = [runs[f"{stage}-s{seed}"].data.metrics["val/top1"] for seed in (0, 1)]
        expected = f"{statistics.fmean(top1):.4f} ± {statistics.stdev(top1):.4f}"
        assert expected in rows[stage] and " 2/2 " in rows[stage], (expected, rows[stage])
    gain = 100 * (
        statistics.fmean(runs[f"student-s{s}"].data.metrics["val/top1"] for s in (0, 1))
        - statistics.fmean(runs[f"teacher-s{s}"].data.metrics["val/top1"] for s in (0, 1))
    )
    assert f"{gain:+.2f}" in rows["student"]
    assert f"{gain:+.2f}" in (path.parent / "report.md").read_text()
    job_run = tracker.latest_job_run(tracker.experiment_id("tests"), "tiny").info.run_id
    logged = {a.path for a in tracker.client.list_artifacts(job_run, REPORT)}
    assert logged == {f"{REPORT}/report.md", f"{REPORT}/report.png", f"{REPORT}/tradeoff.png"}
