"""`kdpipe run`'s live display: a bar per stage, fed on every poll by the runner's outcomes and what the stages
(and searches) last reported to the job's progress board."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kdpipe.cli.views import console
from kdpipe.driver.state import StageState
from kdpipe.plan import Plan


class StageBars:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.progress = Progress(
            TextColumn("{task.fields[stage]:<14}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=2,
        )
        self.bars = {
            name: self.progress.add_task("", total=None, stage=name, info="pending", start=False) for name in plan.order
        }

    def __enter__(self) -> StageBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def warn(self, line: str) -> None:
        """A line above the bars: the stall watchdog's, or an imported head that starts fresh."""
        self.progress.console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)

    def __call__(self, outcomes: dict, live: dict) -> None:
        for name, outcome in outcomes.items():
            self.show(name, outcome, live.get(name, {}))

    def show(self, name: str, outcome, seen: dict) -> None:
        progress, bar = self.progress, self.bars[name]
        if outcome.status == StageState.RUNNING and seen.get("queued"):
            progress.update(bar, info=f"queued, {seen['queued']}")
        elif outcome.status == StageState.RUNNING and "search" in seen:
            trials, counts = self.plan.stages[name].spec.search.trials, seen["search"]
            ended = counts["done"] + counts["pruned"] + counts["failed"]
            info = f"trials {ended}/{trials}: {counts['running']} running, {counts['pruned']} pruned"
            if counts["best"] is not None:
                info += f", best {counts['best']:.3f}"
            progress.start_task(bar)
            progress.update(bar, total=trials, completed=ended, info=info)
        elif outcome.status == StageState.RUNNING and "epochs" in seen:
            progress.start_task(bar)
            total = seen["epochs"] * seen["steps"]
            done = seen["epoch"] * seen["steps"] + seen["step"]
            info = f"epoch {min(seen['epoch'] + 1, seen['epochs'])}/{seen['epochs']}"
            if "top1" in seen:
                info += f"  top-1 {seen['top1']:.3f}"
            progress.update(bar, total=total, completed=done, info=info)
        elif outcome.status.ended:
            progress.update(bar, total=1, completed=1 if outcome.finished else 0, info=outcome.status)
            progress.stop_task(bar)
        elif outcome.status == StageState.RUNNING:
            progress.start_task(bar)
            progress.update(bar, info="starting workers")
        elif outcome.status == StageState.WAITING:
            progress.update(bar, info="waiting: another kdpipe driver trains it")
