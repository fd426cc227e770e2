"""Failures a long run must survive: a dying worker, a crash mid-checkpoint, bad files, a
non-finite loss, a tracking server that is down. Real Ray processes, real files."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from mlflow.tracking import MlflowClient
from PIL import Image
from test_pipeline import tiny_config

from micl.config import ConfigError, load_config
from micl.models import MaskedViT
from micl.pretrain import PretrainError, run_pretraining
from micl.train import STATE_FILE, save_state

pytestmark = pytest.mark.e2e


def synthetic(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=96", *overrides)


def test_fault_injection_is_refused_without_the_test_switch(monkeypatch):
    monkeypatch.delenv("MICL_ALLOW_FAULT_INJECTION", raising=False)
    with pytest.raises(ConfigError, match="run.inject_fault"):
        load_config(overrides=["run.inject_fault=1@3"])


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("MICL_ALLOW_FAULT_INJECTION", "1")
    # 96 samples / 2 workers / batch 8 = 6 steps per epoch: step 9 is inside epoch 2.
    cfg = synthetic(tmp_path, "optim.epochs=3", "run.max_failures=1", "run.name=killed",
                    "run.inject_fault=1@9")
    result = run_pretraining(cfg)
    assert result.metrics["epoch"] == 3
    assert result.metrics["restarts"] == 1
    assert (tmp_path / "runs" / "killed" / "faults" / "fault-1-9").exists()  # it did die
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["step"] == 18  # 3 epochs x 6 steps: epoch 2 was redone, not all of training
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("micl-pretrain").experiment_id])
    assert len(runs) == 1  # the restart logged into the same run
    epochs = client.get_metric_history(result.mlflow_run_id, "epoch")
    assert sorted(m.step for m in epochs) == [0, 1, 2, 3]  # epoch 1 not logged twice
    restarts = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id,
                                                                   "restarts")}
    assert restarts == {1: 0, 2: 1, 3: 1}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = MaskedViT(16, 4, 3, 32, 1, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / STATE_FILE
    cfg = load_config(overrides=["method.mask_ratio=0.5"])
    save_state(path, model, opt, 1, 6, cfg, {})
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_state(path, model, opt, 2, 12, cfg, {})
    assert path.read_bytes() == good  # the previous checkpoint is intact
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1


def test_resume_ignores_a_checkpoint_cut_short(ray_local, tmp_path):
    first = run_pretraining(synthetic(tmp_path, "optim.epochs=1", "run.name=cut",
                                      "run.num_workers=1"))
    # What a crash during the next checkpoint leaves behind: a directory Ray Train never
    # registered, with a truncated state file.
    broken = tmp_path / "runs" / "cut" / "checkpoint_2099-01-01_00-00-00.000000"
    broken.mkdir()
    (broken / "state.pt.tmp").write_bytes(b"\x80\x02truncated")
    second = run_pretraining(synthetic(tmp_path, "optim.epochs=2", "run.name=cut",
                                       "run.num_workers=1"))
    assert second.metrics["epoch"] == 2
    state = torch.load(Path(second.checkpoint_path) / STATE_FILE, weights_only=False)
    first_steps = first.metrics["step"]
    assert state["step"] == 2 * first_steps  # resumed after epoch 1, not from scratch


def write_bad_and_odd_images(root: Path) -> tuple[int, int]:
    """Convertible odd modes and undecodable files next to the good ones.
    Returns (convertible, undecodable)."""
    d = root / "train" / "cat"
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(d / "deep.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / "rgba.png")
    jpeg = (d / "img_0.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) - 200])
    return 4, 1


def test_bad_data_is_skipped_and_counted_and_odd_modes_are_used(ray_local, tmp_path):
    info = make_image_folder(tmp_path / "data", n_per_class=12, size=20, split="train")
    make_image_folder(tmp_path / "data", n_per_class=4, size=20, split="val", bad_files=False)
    convertible, truncated = write_bad_and_odd_images(tmp_path / "data")
    undecodable = len(info["bad"]) + truncated  # corrupt, zero-byte, text, truncated

    from micl.data.sources import load_split
    from micl.data.stream import train_stream

    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={info['root']}",
                      "data.max_bad_fraction=0.2")
    rows = train_stream(load_split(cfg, "train"), cfg, 0).take_all()
    assert len(rows) == info["good"] + convertible
    result = run_pretraining(cfg)
    assert result.metrics["skipped"] == undecodable


def test_too_many_bad_files_fail_with_examples(ray_local, tmp_path):
    info = make_image_folder(tmp_path / "data", n_per_class=12, size=20, split="train")
    make_image_folder(tmp_path / "data", n_per_class=4, size=20, split="val", bad_files=False)
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={info['root']}",
                      "data.max_bad_fraction=0.01", "optim.epochs=1")
    with pytest.raises(PretrainError, match="data.max_bad_fraction") as e:
        run_pretraining(cfg)
    assert any(Path(bad).name in str(e.value) for bad in info["bad"])


def test_non_finite_loss_stops_with_a_usable_checkpoint(ray_local, tmp_path):
    # A temperature this small overflows the logits to inf on the first step.
    cfg = synthetic(tmp_path, "method.temperature=1e-45", "run.name=nan", "run.num_workers=1")
    with pytest.raises(PretrainError, match="non-finite"):
        run_pretraining(cfg)
    states = sorted((tmp_path / "runs" / "nan").glob(f"checkpoint_*/{STATE_FILE}"))
    assert states, "no checkpoint was saved before stopping"
    state = torch.load(states[-1], weights_only=False)
    assert state["nonfinite_at_step"] == 0
    encoder = MaskedViT.from_config(cfg.model)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state["model"].items()
                             if k.startswith("encoder.")})
    assert all(torch.isfinite(p).all() for p in encoder.parameters())


def test_training_survives_an_unreachable_tracking_server(ray_local, tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = synthetic(tmp_path, "run.num_workers=1", f"run.tracking_uri=http://127.0.0.1:{port}")
    with pytest.warns(UserWarning, match="WITHOUT recording"):
        result = run_pretraining(cfg)
    assert result.mlflow_run_id is None
    assert result.metrics["epoch"] == 2 and "knn_top1" in result.metrics
