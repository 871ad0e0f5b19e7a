"""Training throughput side by side, in one run: (a) a bare PyTorch loop written here, (b) kdpipe's engine in one
process, (c) a whole kdpipe stage through Ray Train; and (c)'s fixed start/end cost beside Ray Train's own floor.

(a) and (b) train the same student on the same batches, already on the device (no data loading in either), with the
same models (`kdpipe.models` builds the networks; the loop, the loss and the optimizer of (a) are written below,
and the KD teacher is a fresh network: its weights do not change the cost). They alternate for `--rounds` rounds;
each round's engine rate is divided by the bare loop's rate of the same round, and the median of those ratios counts
(this machine's speed drifts over minutes and jumps for seconds: comparing each side's best round swung from 0.89x
to 1.10x between runs of the same code). (c) runs a teacher stage (labels only) and a student stage (`--method`) of
a job on Fashion-MNIST held in memory, resized to `--size` and normalized per batch, without augmentation (so
augmentation is counted in neither); a stage's steady rate is its best epoch after the first, from the
`images_per_second` it logs over its training steps. A stage's fixed cost is its wall time minus its epochs'. Ray
Train's floor is an empty 2-worker `TorchTrainer.fit()` (its loop only reports) with Ray Train's default settings;
beside it, the same empty fit through the trainer kdpipe runs stages with (`kdpipe.driver.trainer`) and kdpipe's
settings (`kdpipe.driver.launch.RAY_TRAIN_SETTINGS`): what kdpipe lowered of the floor; and, for the job's first stage,
the first fit of a Ray session (it also imports Ray Train and starts Ray Train's session-wide actors). The job and the
floors run `--repeats` times, alternating, each in a new process with a Ray session of its own, as every `kdpipe run`
has (so the teacher is a job's first stage every time); the medians count, and each run's ratio to the floors of its own
round is printed beside them. Then what the floor is made of: the processes Ray starts for one more empty fit, by
when each started, and their CPU seconds. Each fixed cost and floor is split into its start (to the first epoch, or
to the empty loop) and its end, by the times MLflow holds and the empty loop reports, with how many cores were busy
during each start (all of them: a start is CPU-bound, so CPU a stage adds there is wall time). Last, the largest
part of kdpipe's share: what a stage's workers import at start beyond an empty fit's, timed alone in a new process.

    .venv/bin/python bench/step.py                        # the quickstart's models on CPU
    python bench/step.py --device cuda --teacher resnet50 --student resnet18 --size 224 --batch 256 \\
        --precision bf16 --no-stage                       # on a GPU without Ray: (a) and (b) only
    python bench/step.py ... --shards 20000 --shard-px 320 --loader-workers 16   # and (d) over shards

(d), with `--shards N`: the shard reader alone and feeding the engine's step, one epoch each after one untimed, with
images decoded in the loader workers (`data.decode: cpu`) and where the model runs (`gpu`), each against (b).

Prints images/s and the ratios engine / bare and stage / bare, then the stages' fixed costs, the floors and their
processes, and what a worker imports beyond an empty fit's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdpipe.job.spec import DataSpec, StageSpec
from kdpipe.methods import METHODS
from kdpipe.models import build_model
from kdpipe.worker.engine import Engine, single_process_group

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
CLASSES, TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 10, 4.0, 0.1, 0.9  # KD as the quickstart runs it
FIRST = "a Ray session's first fit"
RAY_TRAIN, KDPIPES = "Ray Train's TorchTrainer", "kdpipe's trainer and settings"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batches: list, steps: int, device: torch.device) -> float:
    """Run `steps` steps over the batches (after a few untimed ones) and return images per second."""
    for images, labels in batches[:3]:
        step(images, labels)
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    synchronize(device)
    return steps * len(batches[0][0]) / (time.perf_counter() - started)


def bare_loop(args: argparse.Namespace, device: torch.device):
    """The step written with nothing but PyTorch: SGD, cross-entropy and Hinton's KD, autocast for 16-bit."""
    torch.manual_seed(0)
    student = build_model(args.student, CLASSES).to(device, memory_format=torch.channels_last).train()
    teacher = build_model(args.teacher, CLASSES).to(device, memory_format=torch.channels_last).eval()
    teacher.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            logits = student(images)
            loss = F.cross_entropy(logits, labels)
            if args.method == "kd":
                with torch.no_grad():
                    soft = F.log_softmax(teacher(images) / TEMPERATURE, dim=1)
                kl = F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), soft, reduction="batchmean", log_target=True)
                loss = CE_WEIGHT * loss + KD_WEIGHT * TEMPERATURE**2 * kl
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def engine_loop(args: argparse.Namespace, device: torch.device):
    """kdpipe's engine: the method in a DeepSpeed engine, one process."""
    single_process_group(device)
    torch.manual_seed(0)
    teacher = build_model(args.teacher, CLASSES).to(device).eval()
    teachers = [teacher.requires_grad_(False)] if args.method == "kd" else []
    method_cls = METHODS[args.method]
    method = method_cls(build_model(args.student, CLASSES), teachers, method_cls.Params(), model=args.student)
    stage = StageSpec(
        name="bench",
        model=args.student,
        method=args.method,
        teachers=["t"] * len(teachers),
        epochs=1,
        optimizer={"lr": 0.1},
        schedule={"name": "constant"},
        deepspeed={"precision": args.precision},
        workers={"gpus": 1 if device.type == "cuda" else 0},
    )
    engine = Engine(method, stage, args.batch, device)
    engine.ds.train()
    return engine.step


def over_shards(args: argparse.Namespace, device: torch.device, step, root: Path) -> dict[str, float]:
    """(d): the shard reader alone and the engine's step fed by it, one epoch each over `--shards` synthetic JPEGs
    (`--shard-px` px, cropped to `--size`), with images decoded in the loader workers and where the model runs."""
    from kdpipe.data import prepare_data
    from kdpipe.data.convert import convert
    from kdpipe.data.loaders import open_data
    from kdpipe.data.synthetic import write_image_folder

    write_image_folder(root / "jpegs", CLASSES, args.shard_px, args.shards, CLASSES, seed=0)
    convert(root / "jpegs", root / "shards", shard_size=1000, workers=args.loader_workers or 1)
    rates = {}
    for decode in ("cpu", "gpu"):
        spec = DataSpec(
            source="shards",
            path=str(root / "shards"),
            image_size=args.size,
            batch_size=args.batch,
            loader_workers=args.loader_workers,
            decode=decode,
        )
        data = open_data(prepare_data(spec), spec, 0, 0, 1, pin_memory=device.type == "cuda")
        for fed, label in ((False, "reader"), (True, "engine over shards")):
            for epoch in range(2):  # the first: worker start-up and page cache; the second is timed
                synchronize(device)
                started, count = time.perf_counter(), 0
                for images, labels in data.train_batches(epoch):
                    inputs = data.inputs(images, device)
                    if fed:
                        step(inputs, labels.to(device, non_blocking=True))
                    count += len(labels)
                synchronize(device)
            rates[f"{label}, decoded {'in the workers' if decode == 'cpu' else 'on ' + device.type}"] = count / (
                time.perf_counter() - started
            )
    return rates


class CoresBusy:
    """How many of the machine's cores were busy between two moments of the run (every process: Ray's, the workers',
    this one's), from the system's CPU times, read every 0.1 s in a thread (microseconds each)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        while not self.done.is_set():
            times = psutil.cpu_times()  # guest time is inside user time already
            busy = times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)
            self.samples.append((time.time(), busy))
            self.done.wait(0.1)

    def between(self, start: float, end: float) -> float:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        (first, before), (last, after) = inside[0], inside[-1]
        return (after - before) / max(last - first, 1e-9)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def stage_job(args: argparse.Namespace, root: Path) -> dict:
    """A teacher (labels only) and a student (`--method`) on Fashion-MNIST in memory, each `--stage-epochs`."""
    workers = {"count": args.workers, "gpus": 1 if args.device == "cuda" else 0}
    common = {"epochs": args.stage_epochs, "optimizer": {"lr": 0.1}, "workers": workers}
    common["deepspeed"] = {"precision": args.precision}
    return {
        "name": "bench-step",
        "workdir": str(root / "out"),
        "data": {
            "source": "fashion-mnist",
            "path": str(args.data),
            "image_size": args.size,
            "batch_size": args.batch,
            "augment": False,
            "loader_workers": 0,
            "train_subset": args.train_subset,
        },
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench"},
        "stages": [
            {"name": "teacher", "model": args.teacher, "method": "ce", **common},
            {"name": "student", "model": args.student, "method": args.method, "teachers": ["teacher"], **common},
        ],
    }


class Fit(NamedTuple):
    """An empty fit: its seconds, those that passed before its loop ran (its start), and when it was called."""

    seconds: float
    start: float
    called: float  # wall clock


def empty_fit(storage: str, kdpipes: bool = False) -> Fit:
    """A 2-worker `TorchTrainer.fit()` whose loop only reports: Ray Train's own start and end (and its import, the
    first time in a process); `kdpipes`: through the trainer kdpipe runs its stages with (`kdpipe.driver.trainer`).
    Rank 0 writes when the loop ran beside the run's storage (the bench runs on one machine)."""
    called = time.time()  # wall clock: the loop runs in other processes
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdpipe.driver.trainer import StageTrainer

    def loop(config: dict) -> None:
        if ray.train.get_context().get_world_rank() == 0:
            Path(config["mark"]).write_text(str(time.time()))
        ray.train.report({"done": 1})

    name = f"floor-{time.time_ns()}"
    mark = Path(storage) / f"{name}.loop-started"
    mark.parent.mkdir(parents=True, exist_ok=True)
    (StageTrainer if kdpipes else TorchTrainer)(
        loop,
        train_loop_config={"mark": str(mark)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    ).fit()
    return Fit(time.time() - called, float(mark.read_text()) - called, called)


def floor_fits(storage: str) -> dict[str, Fit]:
    """In a new process that has just started Ray as `kdpipe run` does (this script again, with `--floors`): the
    session's first fit, as a job's first stage meets it, then Ray Train's own `TorchTrainer` with its default
    settings (the floor) and kdpipe's trainer with kdpipe's settings (`kdpipe.driver.launch.RAY_TRAIN_SETTINGS`)."""
    from kdpipe.driver.launch import RAY_TRAIN_SETTINGS, ensure_ray

    ensure_ray(verbose=False)
    fits = {FIRST: empty_fit(storage)}
    for name in (RAY_TRAIN, KDPIPES):
        saved = {key: os.environ.pop(key, None) for key in RAY_TRAIN_SETTINGS}
        if name == KDPIPES:
            os.environ.update(RAY_TRAIN_SETTINGS)
        fits[name] = empty_fit(storage, kdpipes=name == KDPIPES)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return fits


def in_new_process(option: str, folder: Path):
    """What this script prints as JSON on its last line when run again with `option FOLDER` (and the same
    arguments): a job's driver and Ray session of its own, as each `kdpipe run` has."""
    done = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], option, str(folder)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{option} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def floor_processes(storage: str) -> tuple[list[tuple[float, str, float]], float]:
    """One more empty fit, watched: the processes Ray starts for it (or hands an idle pooled one), each by its Ray
    title (an actor's class), when it started, in seconds after `fit()` was called, and the CPU seconds it used
    in the fit (until last seen); and when `fit()` returned. Watching /proc every 50 ms costs some CPU, so this fit
    is none of the floor's."""
    import psutil

    def title(process: psutil.Process) -> str:
        # An actor's process is titled by its class while idle, by its running method otherwise.
        return " ".join(process.info["cmdline"] or []).removeprefix("ray::").split(".")[0].strip()

    before = {process.info["pid"]: title(process) for process in psutil.process_iter(["pid", "cmdline"])}
    started_at: dict[int, tuple[float, str, float]] = {}
    cpu: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for process in psutil.process_iter(["pid", "cmdline", "create_time", "cpu_times"]):
                pid, name, times = process.info["pid"], title(process), process.info["cpu_times"]
                if times is None:
                    continue
                cpu[pid] = times.user + times.system
                if name[:1].isupper() and name != "IDLE" and name != before.get(pid):
                    pooled = pid in before  # its CPU before the fit gave it work is not the fit's
                    at = time.time() if pooled else process.info["create_time"]
                    started_at.setdefault(pid, (at, name + " (pooled)" * pooled, cpu[pid] if pooled else 0.0))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    called = time.time()
    watcher.start()
    seconds = empty_fit(storage).seconds
    done.set()
    watcher.join()
    return sorted((at - called, name, cpu[pid] - used) for pid, (at, name, used) in started_at.items()), seconds


def worker_start() -> dict[str, float]:
    """What a stage's worker imports beyond an empty fit's, in seconds, timed alone in a new process
    (`python -X importtime`) as a worker imports it (the garbage collector paused): the training stack
    (`kdpipe.worker.stage`), and its largest parts."""
    imports = (  # an empty fit's workers import Ray Train too
        "import ray.train.torch\nfrom kdpipe.startup import collector_paused\n"
        "with collector_paused():\n    import kdpipe.worker.stage"
    )
    command = [sys.executable, "-X", "importtime", "-c", imports]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    cumulative: dict[str, float] = {}
    for line in done.stderr.splitlines():  # "import time: self [us] | cumulative | name", nested names indented
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[1].strip().isdigit():
            cumulative.setdefault(fields[2].strip(), int(fields[1]) / 1e6)
    stack = cumulative["kdpipe.worker.stage"]
    parts = {name: cumulative.get(name, 0.0) for name in ("torch._dynamo", "mlflow")}
    return {"training stack": stack, **parts, "the rest of the stack": stack - sum(parts.values())}


def stage_figures(args: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    """Each stage's steady images/s and fixed cost from a real `run_job` (in a new process: `--stage-job`), and
    where the fixed cost falls, from the times MLflow holds (each epoch's metrics are logged as it ends; the run ends
    when the driver sees the stage done): its start (from its launch to its first epoch, both on the wall clock),
    between epochs (checkpoints) and its end (after the last epoch's metrics)."""
    from kdpipe.driver.runner import run_job
    from kdpipe.job.spec import JobSpec
    from kdpipe.plan import plan_job
    from kdpipe.tracking.store import Tracker

    plan = plan_job(JobSpec.model_validate(stage_job(args, root)))
    outcomes = run_job(plan)
    tracker = Tracker(plan.job.tracking.uri)
    figures = {}
    for name, outcome in outcomes.items():
        if not outcome.finished:
            raise SystemExit(f"stage {name} failed: {outcome.error}")
        history = tracker.metric_history(outcome.run_id, ["images_per_second"])
        rates = [value for epoch, value in history["images_per_second"] if epoch > 0]
        epochs = sorted(tracker.client.get_metric_history(outcome.run_id, "epoch_seconds"), key=lambda m: m.step)
        fixed = outcome.seconds - sum(m.value for m in epochs)
        ended = tracker.get_run(outcome.run_id).info.end_time / 1000
        launched, first_epoch = ended - outcome.seconds, epochs[0].timestamp / 1000 - epochs[0].value
        figures[name] = {
            "rate": max(rates),
            "fixed": fixed,
            "wall": outcome.seconds,
            "start": first_epoch - launched,
            "launched": launched,
            "end": ended - epochs[-1].timestamp / 1000,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet14", help="the KD teacher, and (c)'s first stage")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--method", choices=["kd", "ce"], default="kd", help="the student's method")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--batch", type=int, default=64, help="images per step and worker (default 64)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round of (a) and (b)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of (a) and (b)")
    parser.add_argument("--no-stage", dest="stage", action="store_false", help="skip (c) and the floors (no Ray)")
    parser.add_argument("--shards", type=int, default=0, help="(d): synthetic JPEGs to shard and read (0: skip (d))")
    parser.add_argument("--shard-px", type=int, default=40, help="(d): side of the stored JPEGs (default 40)")
    parser.add_argument("--loader-workers", type=int, default=2, help="(d): DataLoader workers (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="(c): Ray Train workers per stage (default 2)")
    parser.add_argument("--stage-epochs", type=int, default=3, help="(c): epochs per stage (default 3)")
    parser.add_argument("--train-subset", type=int, default=6000, help="(c): Fashion-MNIST training samples")
    parser.add_argument("--repeats", type=int, default=3, help="(c) and the floors, alternating (medians count)")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    parser.add_argument("--floors", type=Path, help=argparse.SUPPRESS)  # see in_new_process()
    parser.add_argument("--stage-job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floors:
        fits = floor_fits(str(args.floors))
        processes, watched = floor_processes(str(args.floors))
        print(json.dumps({"fits": fits, "processes": processes, "watched": watched}))
        return
    if args.stage_job:
        print(json.dumps(stage_figures(args, args.stage_job)))
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())  # one process may use every core, as a bare script would

    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(
                device, memory_format=torch.channels_last
            ),
            torch.randint(0, CLASSES, (args.batch,), generator=generator).to(device),
        )
        for _ in range(4)
    ]
    loops = {"bare PyTorch loop": bare_loop(args, device), "kdpipe engine, 1 process": engine_loop(args, device)}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            rates[name].append(images_per_second(step, batches, args.steps, device))
    bare_rounds = rates["bare PyTorch loop"]
    what = f"{args.method} {args.teacher} -> {args.student}" if args.method == "kd" else f"ce {args.student}"
    backend = f"{torch.distributed.get_backend()} group of {torch.distributed.get_world_size()}"
    print(f"{what}, {args.size} px, batch {args.batch}, {args.precision}, {args.device}; engine: {backend}", flush=True)
    for name, values in rates.items():
        ratio = statistics.median(value / bare for value, bare in zip(values, bare_rounds, strict=True))
        median = statistics.median(values)
        print(f"  {name:34s} {median:9.1f} images/s   {ratio:5.2f}x bare (median of {args.rounds} same-round ratios)")
    if args.shards:
        with tempfile.TemporaryDirectory() as folder:
            fed = over_shards(args, device, loops["kdpipe engine, 1 process"], Path(folder))
        engine = statistics.median(rates["kdpipe engine, 1 process"])
        for name, rate in fed.items():
            print(f"  {name:48s} {rate:9.1f} images/s   {rate / engine:5.2f}x the engine on batches in memory")
    if not args.stage:
        return

    cores = CoresBusy()
    runs: list[tuple[dict[str, Fit], dict[str, dict]]] = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):  # a job's run, then the floors, each in a new process and Ray session
            figures = in_new_process("--stage-job", Path(folder) / f"job-{repeat}")
            floors = in_new_process("--floors", Path(folder) / "floor")
            runs.append(({name: Fit(*fit) for name, fit in floors["fits"].items()}, figures))
        # This machine's speed drifts over minutes: time the bare loop again right after the stages, and compare
        # the stage with the faster of the two.
        bare_after = max(images_per_second(loops["bare PyTorch loop"], batches, args.steps, device) for _ in range(2))
        cores.stop()
        start = worker_start()
    bare = max(*bare_rounds, bare_after)
    student = max(figures["student"]["rate"] for _, figures in runs)
    print(f"  {'bare PyTorch loop, after (c)':34s} {bare_after:9.1f} images/s")
    print(
        f"  {'kdpipe stage, ' + str(args.workers) + ' Ray Train workers':34s} {student:9.1f} images/s   "
        f"{student / bare:5.2f}x bare (the student stage's best steady epoch, against the faster bare round)"
    )
    print(
        f"fixed cost (wall time minus epochs), the median of {args.repeats} runs alternating with Ray Train's floor "
        f"(an empty 2-worker fit), and how many of the machine's {os.cpu_count()} cores were busy (all processes) as "
        "each started:"
    )
    fits = {name: statistics.median_low([run[name] for run, _ in runs]) for name in (FIRST, RAY_TRAIN, KDPIPES)}
    notes = {FIRST: "TorchTrainer, in a new driver process that started Ray as kdpipe does", RAY_TRAIN: "the floor"}
    for name, fit in fits.items():
        busy = cores.between(fit.called, fit.called + fit.start)
        print(
            f"  {name:30s} {fit.seconds:6.1f} s   start {fit.start:4.1f} s ({busy:.1f} cores busy), "
            f"end {fit.seconds - fit.start:3.1f} s   ({notes.get(name, 'what kdpipe lowered of the floor')})"
        )
    for name, floor in (("teacher", FIRST), ("student", RAY_TRAIN)):  # the job's first stage, then a later one
        stages = [figures[name] for _, figures in runs]
        stage = sorted(stages, key=lambda s: s["fixed"])[(len(stages) - 1) // 2]  # the median (the lower of two)
        ratios = ", ".join(f"{figures[name]['fixed'] / run[floor].seconds:.2f}x" for run, figures in runs)  # paired
        beside = f"{stage['fixed'] / fits[floor].seconds:4.2f}x {'the first fit' if floor == FIRST else 'the floor'}"
        if floor == RAY_TRAIN:
            beside += f", {stage['fixed'] / fits[KDPIPES].seconds:4.2f}x kdpipe's trainer's empty fit"
        print(f"  {name:8s} stage: {stage['fixed']:5.1f} s fixed of {stage['wall']:5.1f} s   {beside} (runs: {ratios})")
        between = stage["fixed"] - stage["start"] - stage["end"]
        busy = cores.between(stage["launched"], stage["launched"] + stage["start"])
        print(
            f"  {'':15s} start {stage['start']:4.1f} s (launch to the first epoch, {busy:.1f} cores busy), "
            f"{between:3.1f} s between epochs (checkpoints), end {stage['end']:3.1f} s (after the last epoch's metrics)"
        )
    processes, watched = floors["processes"], floors["watched"]  # the last run's
    print("what the floor is made of: the processes Ray starts for one more empty fit, by when each started")
    started = ", ".join(f"+{at:.1f} s {title} ({used:.1f} CPU-s)" for at, title, used in processes)
    total = sum(used for _, _, used in processes)
    print(f"  {started}; {total:.1f} CPU-s in all; fit() returned at +{watched:.1f} s")
    print("what a stage's workers import at start beyond an empty fit's, timed alone in a new process:")
    parts = ", ".join(f"{name} {start[name]:.1f} s" for name in ("torch._dynamo", "mlflow", "the rest of the stack"))
    print(f"  importing the training stack       {start['training stack']:6.1f} s   every worker: {parts}")
    print("  (torch._dynamo is what the first torch.optim optimizer of any training process imports)")


if __name__ == "__main__":
    main()
