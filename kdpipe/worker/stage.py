"""A stage inside each Ray Train worker: the glue that hands the engine its data, its teachers, a checkpoint sink,
an epoch log and a progress reporter (`kdpipe.worker.sinks`).

    data (this rank's reader) ─┐
    teachers (MLflow weights,  ─┼─> method -> Engine.train(data, start, sink, log, progress, caches) -> weights
      behind their cache)       │
    restore (Ray Train/MLflow) ─┘
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdpipe.data import NORMALIZATION
from kdpipe.data.loaders import StageData, open_data
from kdpipe.methods import METHODS
from kdpipe.models import WEIGHTS_FILE, build_model, expected_input, load_weights, save_weights
from kdpipe.models.inputs import ModelInput, adapt_input, input_adapter
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.tags import TAG_NODE
from kdpipe.worker import artifacts
from kdpipe.worker.engine import PRECISIONS, Engine, autocast, evaluate
from kdpipe.worker.sinks import BestEpoch, BoardProgress, RunLog, StageCheckpoints
from kdpipe.worker.task import InitRef, StageTask, TeacherRef
from kdpipe.worker.teacher_cache import CachedTeacher, Exact, TeacherCache, TeacherCaches, TopK
from kdpipe.worker.tracking_actor import ActorTracker

PROBE_SIZE = 16


def load_teacher(ref: TeacherRef, task: StageTask, device: torch.device) -> nn.Module:
    """A teacher stage's final weights, frozen and in eval mode (BN running statistics) from the start; fp32, run
    under the stage's autocast like the student; weights imported with an input of their own get it."""
    with RunArtifacts(ref.artifact_uri, task.tracking_uri).downloaded(artifacts.WEIGHTS) as folder:
        teacher, wanted = load_weights(folder), expected_input(folder)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if wanted:
        adapt_input(teacher, input_adapter(*NORMALIZATION[task.data.normalization], wanted, device))
    return teacher


def load_init(model: nn.Module, init: InitRef, tracking_uri: str) -> None:
    """The stage's starting weights (fitted by the driver) into `model`; the fresh keys keep their initialisation."""
    with RunArtifacts(init.artifact_uri, tracking_uri).downloaded(artifacts.INIT) as folder:
        missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    if sorted(missing) != sorted(init.fresh) or unexpected:  # the driver fitted them to this very model
        raise RuntimeError(f"init weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")


def import_stage(task: StageTask, student: nn.Module, data: StageData, device: torch.device, rank: int) -> None:
    """A stage of no epochs: its imported weights evaluated on the job's held-out split, and stored as its result."""
    stage, wanted = task.stage, task.init.wanted
    student = student.to(device).eval()
    if wanted:
        adapt_input(student, input_adapter(*NORMALIZATION[task.data.normalization], wanted, device))
    metrics = evaluate(student, data, device, PRECISIONS[stage.deepspeed.precision])
    if rank == 0:
        ActorTracker(task.job).log_metrics(task.run_id, metrics, step=0)
        files = RunArtifacts(task.artifact_uri, task.tracking_uri)
        save_final_weights(files, stage.model, student, data.num_classes, artifacts.WEIGHTS, stage.model_args, wanted)


def cached_teachers(
    task: StageTask, teachers: list[nn.Module], rank: int, world: int, classes: int
) -> list[CachedTeacher]:
    """The teachers behind the teacher-output cache, when the stage uses one (`task.cache`); else none."""
    if task.cache is None:
        return []
    k = task.cache.top_k
    encoding = TopK(k, classes) if 0 < k < classes else Exact()
    caches = [TeacherCache(task.cache.root, key, rank, encoding) for key in task.cache_keys(world)]
    return [CachedTeacher(teacher, cache) for teacher, cache in zip(teachers, caches, strict=True)]


@torch.no_grad()
def log_teacher_probe(
    files: RunArtifacts, task: StageTask, teachers: list[nn.Module], data: StageData, device: torch.device
) -> None:
    """Record what each loaded teacher outputs on a fixed held-out batch: provenance a user (or a test) can check
    against the teacher stage's own saved weights."""
    images = data.inputs(next(iter(data.val_batches()))[0][:PROBE_SIZE], device)
    probe = {"images": images.float().cpu().contiguous()}  # safetensors stores the default layout only
    probe.update({ref.stage: t(images).float().cpu() for ref, t in zip(task.teachers, teachers, strict=True)})
    with tempfile.TemporaryDirectory() as folder:
        save_file(probe, str(Path(folder) / artifacts.PROBE_FILE))
        files.log_files([Path(folder) / artifacts.PROBE_FILE], artifacts.TEACHERS)


def save_final_weights(
    files: RunArtifacts,
    model: str,
    network: nn.Module,
    num_classes: int,
    to: str,
    args: dict | None = None,
    wanted: ModelInput | None = None,
) -> None:
    """A network's weights (the stage's, its best epoch's, or a peer's) into the run's folder `to`: safetensors
    and the facts needed to rebuild the module."""
    with tempfile.TemporaryDirectory() as folder:
        save_weights(network, model, num_classes, Path(folder), args, wanted)
        files.log_folder(Path(folder), to)


def stage_loop(task: StageTask) -> None:
    """One rank of a stage, inside Ray Train's worker."""
    stage = task.stage
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(task.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's too)
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    files, tracker = RunArtifacts(task.artifact_uri, task.tracking_uri), None
    if rank == 0:
        tracker = ActorTracker(task.job)
        tracker.set_tags(task.run_id, {f"{TAG_NODE}.{r}": node for r, node in enumerate(nodes)})

    data = open_data(task.data, task.reading, task.seed, rank, world, pin_memory=device.type == "cuda")
    # First: its initial weights depend on the seed alone.
    student = build_model(stage.model, data.num_classes, stage.model_args)
    if task.init is not None:
        load_init(student, task.init, task.tracking_uri)
    if stage.epochs == 0:
        import_stage(task, student, data, device, rank)
        return
    teachers = [load_teacher(ref, task, device) for ref in task.teachers]
    cached = cached_teachers(task, teachers, rank, world, data.num_classes)
    method_cls = METHODS[stage.method]
    setting = {"model": stage.model, "num_classes": data.num_classes, "image_size": task.reading.image_size}
    method = method_cls(student, cached or teachers, task.params, **setting)
    engine = Engine(method, stage, task.reading.batch_size, device)
    if rank == 0 and teachers:
        log_teacher_probe(files, task, teachers, data, device)
    sink = StageCheckpoints(task, files, tracker, engine)
    start = sink.restore()
    log, progress = RunLog(tracker, files, task.run_id, stage), BoardProgress(task.job, stage, rank)

    def save_student(to: str) -> None:
        save_final_weights(files, stage.model, engine.method.student, data.num_classes, to, stage.model_args)

    if stage.result == "best":
        log = BestEpoch(log, lambda: save_student(artifacts.BEST))
    engine.train(data, start, sink, log, progress, TeacherCaches(cached))
    if rank == 0:  # after the loop: a stage resumed from its very last checkpoint still stores its weights
        if stage.result == "best":
            with files.downloaded(artifacts.BEST) as best:
                files.log_folder(best, artifacts.WEIGHTS)
        else:
            save_student(artifacts.WEIGHTS)
        for peer, (model, network) in engine.method.peers().items():
            save_final_weights(files, model, network, data.num_classes, artifacts.weights_folder(peer))


@torch.inference_mode()
def fill_teacher_cache(task: StageTask, rank: int, world: int) -> dict[str, float]:
    """Run rank `rank`'s teachers over every view that rank trains on in all the stage's epochs, filling the
    teacher-output cache (a plain Ray task, ahead of a search's trials). Returns the teacher batches computed and
    read."""
    stage = task.stage
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray shows a task its own GPUs only
    dtype = PRECISIONS[stage.deepspeed.precision]
    data = open_data(task.data, task.reading, task.seed, rank, world, pin_memory=device.type == "cuda")
    teachers = [load_teacher(ref, task, device) for ref in task.teachers]
    caches = TeacherCaches(cached_teachers(task, teachers, rank, world, data.num_classes))
    counts: dict[str, float] = {}
    for epoch in range(stage.epochs):
        caches.begin_epoch(epoch, data.steps_per_epoch(epoch))
        for step, (images, _) in enumerate(data.train_batches(epoch)):
            caches.at_step(step)
            inputs = data.inputs(images, device)  # exactly as the engine hands them to the method
            with autocast(device, dtype):
                for teacher in caches.teachers:
                    teacher(inputs)
        for name, value in caches.end_epoch().items():
            counts[name] = counts.get(name, 0.0) + value
    return counts
