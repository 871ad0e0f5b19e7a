"""A stage's model out of kdpipe: logged as an MLflow Model, registered, served by stock MLflow, loaded without
kdpipe, exported to ONNX, TorchScript and safetensors, and evaluated on other data. The chain's student
(`conftest.CHAIN`, with `result: best` and `register:`) is the model throughout."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from kdpipe.cli import main
from kdpipe.data import prepare_data
from kdpipe.data.evaluation import EvalSplit, open_split
from kdpipe.driver.deploy import evaluate_model
from kdpipe.driver.evaluation import Evaluation, evaluate
from kdpipe.driver.runner import run_job
from kdpipe.driver.state import StageState
from kdpipe.errors import UserError
from kdpipe.models import build_model
from kdpipe.models.export import export
from kdpipe.models.profile import count_macs, profile
from kdpipe.tracking.logged_model import load_classifier, logged_model_uri
from kdpipe.tracking.store import Tracker
from kdpipe.worker import artifacts
from tests.conftest import CHAIN_MODEL, write_job

SERVED = 16  # images posted to the served model
CONFIG = {"classes": ["a", "b", "c", "d"], "resize": [32, 32], "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def chain(finished_chain):
    root, plan, outcomes = finished_chain
    tracker = Tracker(plan.job.tracking.uri)
    shards = prepare_data(plan.job.data).path
    return root / "job.yaml", plan, tracker, outcomes["student"].run_id, f"shards:{shards}"


def test_the_best_epoch_is_the_result_and_the_student_is_registered_once(chain):
    path, plan, tracker, student, _ = chain
    top1 = [value for _, value in sorted(tracker.metric_history(student, ["val/top1"])["val/top1"])]
    best = top1.index(max(top1))
    assert tracker.client.get_run(student).data.metrics["best_epoch"] == best
    files = tracker.artifacts(student)
    with files.downloaded(artifacts.BEST) as kept, files.downloaded(artifacts.WEIGHTS) as final:
        assert (kept / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    client = MlflowClient(tracker.uri)
    (version,) = client.search_model_versions(f"name = '{CHAIN_MODEL}' AND run_id = '{student}'")
    assert version.tags["kdpipe.stage"] == "student" and version.tags["kdpipe.teachers"] == "assistant"
    assert version.tags["kdpipe.fingerprint"] == tracker.client.get_run(student).data.tags["kdpipe.fingerprint"]
    assert float(version.tags["val/top1"]) == pytest.approx(top1[best], abs=1e-4)  # the best epoch's evaluation
    assert tracker.result_metrics(tracker.client.get_run(student))["val/top1"] == top1[best]  # what the report shows
    assert client.get_model_version_by_alias(CHAIN_MODEL, "candidate").version == version.version
    again = run_job(plan)  # every stage reused: the student is not registered a second time
    assert again["student"].status == StageState.REUSED
    assert len(client.search_model_versions(f"name = '{CHAIN_MODEL}' AND run_id = '{student}'")) == 1
    assert main(["register", str(path), "student", "other-name"]) == 0
    assert client.get_model_version_by_alias("other-name", "candidate").run_id == student


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stock_mlflow_serves_the_registered_student_as_kdpipe_eval_scores_it(chain, tmp_path):
    _, _, tracker, student, data = chain
    samples = itertools.islice(open_split(data, "val").samples(), SERVED)
    images = np.stack([image.numpy() for image, _ in samples])
    port = free_port()
    # As in an activated environment: `mlflow models serve` starts `uvicorn` by name.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracker.uri, PATH=path)
    command = ["mlflow", "models", "serve", "-m", f"models:/{CHAIN_MODEL}@candidate", "--env-manager", "local"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        served = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result, _ = evaluate_model(tracker, student, logged_model_uri(tracker.uri, student), data, "val", lambda **_: None)
    classes = load_classifier(tracker.uri, f"models:/{CHAIN_MODEL}@candidate").classes
    assert [row["label"] for row in served] == [classes[i] for i in result.predicted[:SERVED]]
    probabilities = np.array([row["probabilities"] for row in served])
    np.testing.assert_allclose(probabilities, result.probabilities[:SERVED], atol=1e-5, rtol=0)


def test_the_model_loads_in_a_process_that_never_imports_kdpipe(chain, tmp_path):
    _, _, tracker, _, _ = chain
    model = f"models:/{CHAIN_MODEL}@candidate"
    script = (
        "import sys, mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('{model}')\n"
        "out = model.predict(np.zeros((2, 20, 24, 3), np.uint8))\n"
        "print(len(out), sorted(name for name in sys.modules if name.split('.')[0] == 'kdpipe'))\n"
        f"print(open(mlflow.pyfunc.get_model_dependencies('{model}')).read())\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracker.uri)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    first, *requirements = done.stdout.decode().splitlines()
    assert first == "2 []"
    assert any(line.startswith("torch==") for line in requirements)
    assert not any("kdpipe" in line for line in requirements), requirements


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_v3_small", "timm:test_vit"])
def test_onnx_export_agrees_with_onnxruntime_on_another_batch_size(name, tmp_path):
    network = build_model(name, 4, {"img_size": 32} if name.startswith("timm:") else None).eval()
    path, _ = export(network, {**CONFIG, "constructor": {}}, "onnx", tmp_path)
    batch = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # exported with a batch of 2
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), network(batch), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "preprocessing.json").read_text())["classes"] == CONFIG["classes"]


def test_the_student_exports_to_torchscript_and_safetensors_with_its_outputs(chain, tmp_path):
    path, _, tracker, student, _ = chain
    network = load_classifier(tracker.uri, logged_model_uri(tracker.uri, student)).network
    batch = torch.randn(3, 3, 16, 16)
    assert main(["export", str(path), "student", "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    torch.testing.assert_close(scripted(batch), network(batch))
    command = ["export", student, "--tracking-uri", tracker.uri, "--format", "safetensors"]
    assert main([*command, "--out", str(tmp_path / "st")]) == 0  # by run id
    assert load_file(str(tmp_path / "st" / "model.safetensors")).keys() == network.state_dict().keys()


def write_split_folder(root: Path, classes: list[str], images: list[tuple[np.ndarray, str]]) -> Path:
    for name in classes:
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
    for i, (pixels, name) in enumerate(images):
        Image.fromarray(pixels).save(root / "val" / name / f"{i:04d}.png")
    return root


def test_eval_on_an_image_folder_counts_what_the_served_model_predicts(chain, tmp_path):
    path, _, tracker, student, data = chain
    split = open_split(data, "val")
    images = [(image.numpy(), split.classes[label]) for image, label in split.samples()]
    folder = write_split_folder(tmp_path / "other", split.classes, images)
    assert main(["eval", str(path), "student", "--data", f"imagefolder:{folder}"]) == 0
    model = load_classifier(tracker.uri, logged_model_uri(tracker.uri, student))
    predicted = model.predict(None, np.stack([pixels for pixels, _ in images]))["label"]
    count = sum(label == name for label, (_, name) in zip(predicted, images, strict=True))
    (eval_run,) = tracker.client.search_runs(
        [tracker.client.get_run(student).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{student}' AND params.data = 'imagefolder:{folder}'",
    )
    assert eval_run.data.tags["kdpipe.kind"] == "eval"
    assert eval_run.data.metrics["eval/top1"] == pytest.approx(count / len(images))
    listed = {f.path for f in tracker.client.list_artifacts(eval_run.info.run_id, "eval")}
    assert listed == {"eval/confusion.png", "eval/reliability.png"}


class Stub(EvalSplit):
    def __init__(self, classes: list[str], labels: list[int]):
        super().__init__(classes, len(labels), "stub", "stub", "val")
        object.__setattr__(self, "labels", labels)

    def samples(self):
        return ((torch.full((2, 2, 3), label, dtype=torch.uint8), label) for label in self.labels)


def test_classes_are_matched_by_name_and_other_classes_are_one_line():
    """A data set listing the model's classes in another order: each image is scored against the model's class of
    its own name. A model that names each image's class right gets top-1 1.0 only if the matching is right."""
    model_classes = ["cat", "dog", "emu"]
    data = Stub(["emu", "cat", "dog"], [0, 1, 2, 0, 2])  # emu, cat, dog, emu, dog

    def probabilities(images: np.ndarray) -> np.ndarray:  # the true class by name, from the pixel value
        names = [["emu", "cat", "dog"][int(v)] for v in images[:, 0, 0, 0]]
        return np.eye(3)[[model_classes.index(n) for n in names]]

    result = evaluate(probabilities, model_classes, data)
    assert result.top_k(1) == 1.0 and result.labels.tolist() == [2, 0, 1, 2, 1]
    with pytest.raises(UserError, match="only in the data zebra; only in the model emu"):
        evaluate(probabilities, model_classes, Stub(["zebra", "cat", "dog"], [0]))


def test_top_k_per_class_accuracy_and_calibration_error_by_hand():
    """Four images, two classes. Confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.7 (right), each alone in
    one of 15 equal bins: ECE = (|1 - 0.9| + |0 - 0.8| + |1 - 0.6| + |1 - 0.7|) / 4 = 0.4."""
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    result = Evaluation(["a", "b"], np.array([0, 0, 0, 1]), probabilities)
    assert result.top_k(1) == 0.75 and result.top_k(2) == 1.0
    assert result.per_class() == {"a": 2 / 3, "b": 1.0}
    assert result.calibration_error() == pytest.approx(0.4)
    assert result.confusion().tolist() == [[2, 1], [0, 1]]


def test_model_commands_refuse_bad_input_in_one_line(chain, tmp_path, capsys):
    path, plan, tracker, student, data = chain
    other = tmp_path / "other.yaml"
    job = plan.job.model_dump(exclude_none=True)
    job["stages"][-1]["epochs"] = 3  # a student that never ran
    write_job(other, job)
    out = str(tmp_path / "out")
    folder = write_split_folder(tmp_path / "zoo", ["class_00", "zebra"], [])
    cases = [
        (["export", str(other), "student", "--out", out], "has not finished"),
        (["export", str(path), "nobody", "--out", out], "no stage 'nobody'"),
        (["export", str(path), "student", "--format", "pickle", "--out", out], "expected one of onnx"),
        (["eval", str(path), "student", "--data", f"imagefolder:{folder}"], "only in the data zebra"),
        (["eval", str(path), "student", "--data", "parquet:/x"], "expected SOURCE:PATH"),
        (["register", str(path), "student", "bad/name"], "refuses the model name 'bad/name'"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, (argv, err)


def test_macs_and_parameters_of_a_model_counted_by_hand():
    """A 3x3 convolution, 3 -> 4 channels on 8 x 8 (padding 1): 8*8 outputs * 4 channels * 3*3*3 weights = 6,912
    multiply-accumulates; then a linear layer 256 -> 10: 2,560. Parameters: 108 + 2,560 + 10."""
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    )
    measured = profile(network, 8, threads=1)
    assert measured.macs == 6912 + 2560 and measured.params == 108 + 2560 + 10
    assert measured.latency_ms > 0 and measured.images_per_second > 0 and measured.threads == 1


def test_the_report_shows_each_stage_size_speed_and_share_of_its_teacher(chain, capsys):
    path, _, tracker, student, _ = chain
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "MACs" in out and "of teacher" in out and "ms (b1" in out
    network = load_classifier(tracker.uri, logged_model_uri(tracker.uri, student)).network
    metrics = tracker.client.get_run(student).data.metrics
    assert metrics["model/params"] == sum(p.numel() for p in network.parameters())
    assert metrics["model/macs"] == count_macs(network, 32)  # at the job's image size
    row = next(line for line in out.splitlines() if line.startswith("│ student"))
    assert f"{sum(p.numel() for p in network.parameters()) / 1e3:.2f}k" in row, row
    job_run = tracker.latest_job_run(tracker.client.get_run(student).info.experiment_id, "tiny")
    listed = {f.path for f in tracker.client.list_artifacts(job_run.info.run_id, "report")}
    assert "report/tradeoff.png" in listed
