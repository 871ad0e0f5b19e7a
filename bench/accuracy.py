"""Every method on real data, over 3 seeds: runs jobs/fashion-mnist-methods.yaml through the real pipeline (`kdpipe
run`: Ray Train, DeepSpeed, MLflow) and prints its report (`kdpipe report`): each student's val top-1 and top-5 as
mean ± std over the seeds, and its gain in points over the label-only student. A rerun reuses what already ran.

    .venv/bin/python bench/accuracy.py [--out bench-out/accuracy] [--set PATH=VALUE ...]

Writes OUT/report.md (the README's table comes from it); exits 1 if a stage failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdpipe.cli import main as kdpipe

JOB = Path(__file__).resolve().parents[1] / "jobs" / "fashion-mnist-methods.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/accuracy"), help="where MLflow and Ray go")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args()
    settings = [f"--set={setting}" for setting in args.settings]
    job = str(JOB)
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # the job's relative MLflow store and Ray storage land here; its data path is absolute below
    settings.append(f"--set=data.path={JOB.parents[2] / 'shared' / 'data' / 'fashion-mnist'}")
    ran = kdpipe(["run", job, *settings])
    reported = kdpipe(["report", job, "--markdown", "report.md", *settings])
    return ran or reported


if __name__ == "__main__":
    sys.exit(main())
