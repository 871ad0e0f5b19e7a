"""Teachers from outside kdpipe (`init:`): a teacher trained by a plain PyTorch loop in this file, imported by a
stage of no epochs, evaluated, and distilled; weights from MLflow fine-tuned to other classes; a torchvision hub
file from a filled cache; and every bad source as one line."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from kdpipe.driver.imports import fit_imports, import_digests, source_files
from kdpipe.driver.runner import run_job
from kdpipe.driver.state import StageState
from kdpipe.plan import load_plan
from kdpipe.tracking.files import RunArtifacts
from kdpipe.tracking.store import Tracker
from tests.conftest import FASHION_MNIST, tiny_job, write_job

TEACHER = "shufflenet_v2_x0_5"  # a torchvision model, small enough to train here in seconds
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel mean and std, by which kdpipe normalizes its batches
pytestmark = pytest.mark.timeout(600)


def idx(name: str) -> np.ndarray:
    """An IDX file of Fashion-MNIST, read by hand."""
    data = gzip.decompress((FASHION_MNIST / name).read_bytes())
    if data[2] == 8 and data[3] == 3:  # images: N x 28 x 28
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)


def pixels(images: np.ndarray) -> torch.Tensor:
    """Images as the outside loop feeds its model: pixels in [0, 1], not normalized (kdpipe's batches are)."""
    return (torch.from_numpy(images.copy()).float() / 255)[:, None].expand(-1, 3, -1, -1)


@torch.no_grad()
def top1_count(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> int:
    model.eval()
    predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(64)])
    return int((predicted == torch.from_numpy(labels.astype(np.int64))).sum())


@pytest.fixture(scope="module")
def outside_teacher(tmp_path_factory):
    """A teacher trained by a plain loop on unnormalized pixels: after 40 steps saved as a training script would
    (`.pt`, wrapped, with DataParallel's prefix), after 80 as `.safetensors`; with each one's top-1 count on the
    held-out images."""
    root = tmp_path_factory.mktemp("outside")
    torch.manual_seed(0)
    train_x, train_y = pixels(idx("train-images-idx3-ubyte.gz")[:5120]), idx("train-labels-idx1-ubyte.gz")
    val_x, val_y = pixels(idx("t10k-images-idx3-ubyte.gz")), idx("t10k-labels-idx1-ubyte.gz")
    model = torchvision.models.get_model(TEACHER, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = {}
    for step in range(80):
        model.train()
        index = torch.arange(step * 64, (step + 1) * 64) % len(train_x)
        loss = torch.nn.functional.cross_entropy(model(train_x[index]), torch.from_numpy(train_y[index.numpy()]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step + 1 == 40:
            state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
            torch.save({"epoch": 1, "state_dict": state}, root / "teacher.pt")
            saved["pt"] = (root / "teacher.pt", top1_count(model, val_x, val_y))
    save_file(model.state_dict(), str(root / "teacher.safetensors"))
    saved["safetensors"] = (root / "teacher.safetensors", top1_count(model, val_x, val_y))
    return saved, len(val_y)


def import_job(root: Path, weights: Path) -> Path:
    """The weights imported with the input they were trained on (no normalization), then distilled."""
    init = {"weights": f"file:{weights}", "mean": [0, 0, 0], "std": [1, 1, 1]}
    stages = [
        {"name": "teacher", "model": TEACHER, "init": init, "epochs": 0, "workers": {"count": 1}},
        {"name": "student", "model": "resnet8", "teachers": ["teacher"], "method": "kd", "epochs": 1},
    ]
    job = tiny_job(root, stages)
    job["data"] = {"source": "fashion-mnist", "path": str(FASHION_MNIST), "image_size": 28, "train_subset": 256}
    job["data"].update(batch_size=32, augment=False)
    return write_job(root / f"job-{weights.suffix[1:]}.yaml", job)


def test_an_imported_teacher_is_evaluated_taught_from_and_known_by_its_content(
    ray_local, outside_teacher, tmp_path
) -> None:
    saved, count = outside_teacher
    path, correct = saved["pt"]
    outcomes = run_job(load_plan(import_job(tmp_path, path)))
    assert {o.status for o in outcomes.values()} == {StageState.DONE}, {n: o.error for n, o in outcomes.items()}
    teacher, student = outcomes["teacher"], outcomes["student"]
    # The loop's own count on the same images: kdpipe's normalized batches reach the teacher as its own pixels.
    assert teacher.metrics["val/top1"] == correct / count

    # The student learned from the imported weights themselves: its teacher probe is their output on the pixels
    # of the student's normalized batch.
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    with RunArtifacts(tracker.artifact_uri(student.run_id), tracker.uri).downloaded("teachers") as folder:
        probe = load_file(str(folder / "probe.safetensors"))
    loop_model = torchvision.models.get_model(TEACHER, num_classes=10)
    state = torch.load(path, weights_only=True)["state_dict"]
    loop_model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    with torch.no_grad():
        expected = loop_model.eval()(probe["images"] * STD + MEAN)
    torch.testing.assert_close(probe["teacher"], expected, atol=1e-5, rtol=1e-5)

    # The same file elsewhere: nothing retrains.
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    again = run_job(load_plan(import_job(tmp_path, moved)))
    assert {o.status for o in again.values()} == {StageState.REUSED}
    assert again["student"].run_id == student.run_id


def test_other_weights_change_the_fingerprints_and_safetensors_load_as_they_are(outside_teacher, tmp_path) -> None:
    """A file with other weights (a later step of the same loop, as safetensors) gives the import and its student
    new fingerprints, so both train again (the runner's rule, test_runner); its tensors are imported unchanged."""
    saved, _ = outside_teacher
    plans = {kind: load_plan(import_job(tmp_path, saved[kind][0])) for kind in saved}
    prints = {kind: plan.fingerprints("data", import_digests(source_files(plan))) for kind, plan in plans.items()}
    assert prints["pt"]["teacher"] != prints["safetensors"]["teacher"]
    assert prints["pt"]["student"] != prints["safetensors"]["student"]
    [(stage, init, note)] = fit_imports(plans["safetensors"], source_files(plans["safetensors"]), 10, tmp_path)
    assert (stage, init.fresh, note) == ("teacher", (), "")
    fitted, original = load_file(str(init.path)), load_file(str(saved["safetensors"][0]))
    assert fitted.keys() == original.keys() and all(torch.equal(fitted[k], original[k]) for k in original)


def resnet8_weights(path: Path, classes: int) -> Path:
    """A resnet8 state dict for `classes` classes, saved as safetensors (what a user's own run might log)."""
    from kdpipe.models import build_model

    save_file(build_model("resnet8", classes).state_dict(), str(path))
    return path


def test_a_fine_tune_starts_from_mlflow_weights_for_other_classes(ray_local, tmp_path) -> None:
    """Weights logged in an MLflow run and registered: a stage starts from the registered version (by alias) on data
    of 4 classes, with the head reset said in one line; a run's file is fitted the same way."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(resnet8_weights(tmp_path / "model.safetensors", 10)), "weights")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("outside")
    version = client.create_model_version("outside", f"{run.info.artifact_uri}/weights", run.info.run_id)
    client.set_registered_model_alias("outside", "champion", version.version)

    stage = {"name": "tuned", "model": "resnet8", "epochs": 1, "workers": {"count": 1}}
    stages = [{**stage, "init": "mlflow:models:/outside@champion"}]
    stages.append({**stage, "name": "from-run", "init": f"mlflow:runs:/{run.info.run_id}/weights/model.safetensors"})
    plan = load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages, classes=4)))
    [(_, from_run, note)] = [
        fitted for fitted in fit_imports(plan, source_files(plan), 4, tmp_path) if fitted[0] == "from-run"
    ]
    assert from_run.fresh == ("fc.bias", "fc.weight")
    assert note == "stages[1].init.weights: the weights have 10 classes, the data 4: the classifier head starts fresh"

    # The registered version alone trains.
    plan = load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages[:1], classes=4)))
    notes: list[str] = []
    outcomes = run_job(plan, on_note=notes.append)
    assert outcomes["tuned"].status == StageState.DONE, outcomes["tuned"].error
    assert notes == [note.replace("stages[1]", "stages[0]")]
    tracker = Tracker(uri)
    with tracker.artifacts(outcomes["tuned"].run_id).downloaded("init") as folder:  # where it started, recorded
        assert "fc.weight" not in load_file(str(folder / "model.safetensors"))


def test_a_torchvision_hub_file_is_read_from_the_cache(tmp_path) -> None:
    """torchvision's pretrained weights through a cache the test fills (nothing can be downloaded here): the file
    torchvision's URL names, read from `<workdir>/downloads/torchvision`; the head is reset for 10 classes."""
    cache = tmp_path / "out" / "downloads" / "torchvision"
    cache.mkdir(parents=True)
    hub = torchvision.models.get_model("resnet18", num_classes=1000).state_dict()
    torch.save(hub, cache / "resnet18-f37072fd.pth")
    source = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    stages = [{"name": "teacher", "model": "resnet18", "init": source, "epochs": 0}]
    plan = load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages)))
    [(_, init, note)] = fit_imports(plan, source_files(plan), 10, tmp_path)
    assert note.endswith("the weights have 1000 classes, the data 10: the classifier head starts fresh")
    fitted = load_file(str(init.path))
    assert all(torch.equal(fitted[k], hub[k]) for k in fitted) and fitted.keys() == hub.keys() - set(init.fresh)
    assert source_files(plan, fetch=False).keys() == {source}


def write_bad(tmp_path: Path, init, **stage) -> Path:
    stages = [{"name": "teacher", "model": "resnet8", "init": init, "epochs": 0, **stage}]
    return write_job(tmp_path / "job.yaml", tiny_job(tmp_path, stages))


VALIDATE_CASES = {
    "missing file": ("file:/no/such/teacher.pt", {}, ["stages[0].init.weights", "no such file", "/no/such/teacher.pt"]),
    "unknown torchvision weights": (
        "torchvision:ResNet18_Weights.NOPE",
        {},
        ["stages[0].init.weights", "ResNet18_Weights.NOPE", "ResNet50_Weights.IMAGENET1K_V2"],
    ),
    "unknown timm weights": ("timm:resnet18.nope", {}, ["stages[0].init.weights", "timm has no pretrained weights"]),
    "unknown source": ("hub:resnet18", {}, ["stages[0].init.weights", "torchvision|timm|file|mlflow"]),
    "mlflow uri form": ("mlflow:models:/teacher", {}, ["stages[0].init", "models:/<name>@<alias>"]),
    "import without init": (None, {}, ["stages[0]", "epochs: 0", "init:"]),
    "import with teachers": ("file:/x.pt", {"method": "kd"}, ["stages[0]", "epochs: 0", "no teachers"]),
}


@pytest.mark.parametrize("case", VALIDATE_CASES)
def test_a_bad_source_is_one_line_at_validate(case, tmp_path, capsys) -> None:
    from kdpipe.cli import main

    init, stage, expected = VALIDATE_CASES[case]
    path = write_bad(tmp_path, init, **stage)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(part in err for part in expected), err


def pickled_module(path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)


FIT_CASES = {
    "pickled module": (pickled_module, ["teacher.pt", "torch.nn.modules.linear.Linear", "never unpickles"]),
    "no state dict": (lambda p: torch.save({"epoch": 3, "optimizer": {}}, p), ["no state dict", "epoch, optimizer"]),
    "other model": (
        lambda p: torch.save(torchvision.models.resnet18().state_dict(), p),
        ["stages[0].init.weights", "do not fit", "missing", "unexpected"],
    ),
    "unreachable mlflow run": (None, ["stages[0].init.weights", "cannot read mlflow:runs:/0123/weights", "not found"]),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_a_source_that_cannot_be_read_or_fitted_is_one_line_before_any_stage_trains(case, tmp_path, capsys) -> None:
    from kdpipe.cli import main

    write, expected = FIT_CASES[case]
    if write is None:
        path = write_bad(tmp_path, "mlflow:runs:/0123/weights/model.safetensors")
    else:
        write(tmp_path / "teacher.pt")
        path = write_bad(tmp_path, f"file:{tmp_path / 'teacher.pt'}")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(part in err for part in expected), err
    assert not (tmp_path / "out" / "ray").exists()  # nothing launched


def test_a_timm_hub_file_is_read_from_the_cache_and_loaded_as_timm_loads_it(tmp_path, monkeypatch) -> None:
    """timm's pretrained ViT through a Hugging Face cache the test fills (the Hub cannot be reached here), at
    another image size: timm's own loading resizes the position embedding, and the head is reset for 10 classes."""
    import huggingface_hub
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name, revision = "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "0" * 40
    repo = tmp_path / "out" / "downloads" / "timm" / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    hub = timm.create_model("vit_tiny_patch16_224", num_classes=1000, depth=2).state_dict()
    save_file(hub, str(repo / "snapshots" / revision / "model.safetensors"))

    stage = {"name": "teacher", "model": "timm:vit_tiny_patch16_224", "init": f"timm:{name}", "epochs": 0}
    stage["model_args"] = {"img_size": 32, "depth": 2}
    plan = load_plan(write_job(tmp_path / "job.yaml", tiny_job(tmp_path, [stage])))
    [(_, init, note)] = fit_imports(plan, source_files(plan), 10, tmp_path)
    assert note.endswith("the weights have 1000 classes, the data 10: the classifier head starts fresh")
    fitted = load_file(str(init.path))
    assert fitted["pos_embed"].shape == (1, 1 + 2 * 2, 192)  # 32 px in 16 px patches, and the class token
    assert torch.equal(fitted["cls_token"], hub["cls_token"]) and set(init.fresh) == {"head.weight", "head.bias"}
    assert source_files(plan, fetch=False).keys() == {f"timm:{name}"}
