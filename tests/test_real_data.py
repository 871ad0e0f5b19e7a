"""The real Fashion-MNIST copy in shared/data: converted by `kdpipe data shard`, then trained through the same
path as the quickstart (`kdpipe run`'s runner, Ray Train, 2 DeepSpeed workers, MLflow), each rank reading through
2 DataLoader workers started from the fork server inside its Ray Train worker process."""

from __future__ import annotations

import pytest
import torch

from kdpipe.cli import main
from kdpipe.data import prepare_data
from kdpipe.data.loaders import open_data
from kdpipe.data.shards import read_manifest
from kdpipe.driver.runner import run_job
from kdpipe.models import load_weights
from kdpipe.plan import load_plan
from kdpipe.tracking.store import Tracker
from kdpipe.worker import artifacts
from tests.conftest import FASHION_MNIST, write_job
from tests.shard_damage import garble_image, train_shard


def test_fashion_mnist_shards_train_and_a_skipped_sample_is_logged(ray_local, tmp_path):
    shards = tmp_path / "shards"
    assert main(["data", "shard", str(FASHION_MNIST), str(shards), "--shard-size", "5000", "--workers", "2"]) == 0
    manifest = read_manifest(shards)
    assert manifest["splits"]["train"]["count"] == 60000 and manifest["splits"]["val"]["count"] == 10000
    assert manifest["classes"][:2] == ["T-shirt/top", "Trouser"] and manifest["normalization"] == "fashion-mnist"

    garble_image(train_shard(shards, 4), 11)  # under `bad_samples: skip` the stage trains on and counts it
    job = {
        "name": "fashion",
        "workdir": str(tmp_path / "out"),
        "data": {
            "source": "shards",
            "path": str(shards),
            "image_size": 8,  # resized from 28 px by the reader: a twelfth of the compute, still learnable
            "batch_size": 250,  # 60,000 = 2 ranks x 120 steps x 250: no sample sits the epoch out
            "bad_samples": "skip",
            "loader_workers": 2,  # 12 shards dealt to 2 ranks x 2 workers, each range cut inside a shard
        },
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "fashion"},
        "stages": [{"name": "solo", "model": "resnet8", "epochs": 1, "optimizer": {"lr": 0.1}}],
    }
    plan = load_plan(write_job(tmp_path / "job.yaml", job))
    outcome = run_job(plan)["solo"]
    assert outcome.status == "done", outcome.error
    assert outcome.metrics["data/skipped"] == 1
    assert outcome.metrics["global_step"] == 120
    assert outcome.metrics["val/top1"] > 0.5  # 10 classes (chance 0.1); one epoch of a small ResNet

    # The 2 ranks' held-out scores, summed over ranks, equal the saved weights' scores counted here in one process:
    # every held-out sample was scored exactly once, whichever rank and loader worker read it.
    spec = plan.job.data.model_copy(update={"loader_workers": 0})
    single = open_data(prepare_data(spec), spec, 0, 0, 1)
    with Tracker(job["tracking"]["uri"]).artifacts(outcome.run_id).downloaded(artifacts.WEIGHTS) as folder:
        model = load_weights(folder).eval()
    top1 = top5 = count = 0
    with torch.no_grad():
        for images, labels in single.val_batches():
            best = model(single.inputs(images, torch.device("cpu"))).topk(5, 1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(1).sum())
            count += len(labels)
    assert count == 10000
    assert outcome.metrics["val/top1"] == pytest.approx(top1 / count, abs=1e-12)
    assert outcome.metrics["val/top5"] == pytest.approx(top5 / count, abs=1e-12)
