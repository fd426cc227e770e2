"""End-to-end pre-training on local Ray: real files, a real TorchTrainer, a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BAD_FILES, make_image_folder
from mlflow.tracking import MlflowClient

from micl.config import load_config
from micl.data.prepare import write_parquet_shards
from micl.data.sources import DataError
from micl.models import MaskedViT
from micl.models.export import load_timm_encoder
from micl.pretrain import run_pretraining
from micl.train import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.e2e


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(overrides=[
        "model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "method.mask_ratio=0.5", "data.batch_size=8",
        "data.map_batch_size=16", "data.knn_bank_size=64", "data.knn_query_size=32",
        "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3",
        "run.num_workers=2", "run.cpus_per_worker=0.5", "data.data_cpus=0.5",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def check_mlflow_run(result, cfg, epochs: int) -> MlflowClient:
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.mask_ratio"] == str(cfg.method.mask_ratio)
    assert run.data.params["model.embed_dim"] == str(cfg.model.embed_dim)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, epochs + 1))
    knn = client.get_metric_history(run.info.run_id, "knn_top1")
    assert knn and knn[0].step == 0 and knn[-1].step == epochs  # random init, then trained
    assert all(0 <= m.value <= 1 for m in knn)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "masked_views.png", "encoder"} <= artifacts
    return client


def check_checkpoint_loads(result, cfg, client: MlflowClient) -> None:
    """The final checkpoint and the exported encoder give the same features."""
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["epoch"] == cfg.optim.epochs
    fresh = MaskedViT.from_config(cfg.model).eval()
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in state["model"].items()
                           if k.startswith("encoder.")})
    local = client.download_artifacts(result.mlflow_run_id, "encoder/encoder_timm.pth")
    timm_model = load_timm_encoder(cfg.model, torch.load(local)).eval()
    x = torch.randn(3, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), timm_model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fresh(x), MaskedViT.from_config(cfg.model).eval()(x))


def test_imagefolder_with_bad_files(ray_local, tmp_path):
    info = make_image_folder(tmp_path / "data", n_per_class=12, size=20, split="train")
    make_image_folder(tmp_path / "data", n_per_class=4, size=20, split="val", bad_files=False)
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={info['root']}")
    result = run_pretraining(cfg)
    assert result.metrics["epoch"] == 2
    assert result.metrics["skipped"] == BAD_FILES  # corrupt JPEG, zero-byte file, text file
    client = check_mlflow_run(result, cfg, epochs=2)
    skipped = client.get_metric_history(result.mlflow_run_id, "skipped")
    assert [m.value for m in skipped] == [BAD_FILES, BAD_FILES]
    check_checkpoint_loads(result, cfg, client)


def test_parquet_shards_from_prepare_data(ray_local, tmp_path):
    info = make_image_folder(tmp_path / "folder", n_per_class=12, size=40, split="train")
    make_image_folder(tmp_path / "folder", n_per_class=4, size=40, split="val", bad_files=False)
    write_parquet_shards(info["root"], str(tmp_path / "shards"), size=24, rows_per_shard=10,
                         log=lambda _: None)
    cfg = tiny_config(tmp_path, "data.source=parquet", f"data.path={tmp_path / 'shards'}",
                      "run.name=parquet-run")
    result = run_pretraining(cfg)
    assert result.run_name == "parquet-run"
    assert result.metrics["skipped"] == 0  # prepare_data already dropped the bad files
    check_checkpoint_loads(result, cfg, check_mlflow_run(result, cfg, epochs=2))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist missing")
def test_fashion_mnist(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, "data.source=fashion_mnist", "model.img_size=28",
                      "model.in_chans=1", "data.mean=[0.286]", "data.std=[0.353]",
                      "data.limit_train=256", "data.batch_size=32")
    result = run_pretraining(cfg)
    check_checkpoint_loads(result, cfg, check_mlflow_run(result, cfg, epochs=2))


def test_resume_continues_at_the_next_epoch(ray_local, tmp_path):
    cfg1 = tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=64",
                       "optim.epochs=1", "run.name=resumable", "run.num_workers=1")
    first = run_pretraining(cfg1)
    assert first.metrics["epoch"] == 1
    first_state = torch.load(Path(first.checkpoint_path) / STATE_FILE, weights_only=False)
    cfg2 = tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=64",
                       "optim.epochs=3", "run.name=resumable", "run.num_workers=1")
    second = run_pretraining(cfg2)
    assert second.mlflow_run_id == first.mlflow_run_id  # one MLflow run across the resume
    assert second.metrics["epoch"] == 3
    state = torch.load(Path(second.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["step"] == first_state["step"] * 3  # epochs 2 and 3 added to epoch 1's steps
    client = MlflowClient(second.tracking_uri)
    epochs = client.get_metric_history(second.mlflow_run_id, "epoch")
    assert sorted(m.step for m in epochs) == [0, 1, 2, 3]  # no epoch logged twice


def test_missing_and_empty_paths_fail_before_training(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={tmp_path / 'nope'}")
    with pytest.raises(DataError, match="nope"):
        run_pretraining(cfg)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={tmp_path / 'empty'}")
    with pytest.raises(DataError, match="empty"):
        run_pretraining(cfg)


@pytest.mark.parametrize(("override", "field"), [
    ("method.mask_ratio=1.5", "method.mask_ratio"),
    ("model.img_size=30", "model.img_size"),
])
def test_cli_config_error_is_one_clear_line(override, field):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pretrain.py"),
                           "--set", override], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], proc.stderr
