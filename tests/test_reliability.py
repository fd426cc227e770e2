"""Failures a long run must survive: a dying worker, a crash mid-checkpoint, too many bad files,
a non-finite loss, a tracking server that is down. Real Ray processes, real files. (Bad files
that are skipped and counted: tests/test_pipeline.py::test_imagefolder_two_workers.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from helpers import KillOnce, make_image_folder
from mlflow.tracking import MlflowClient
from test_pipeline import tiny_config

from micl.artifacts import STATE_FILE, save_state
from micl.driver import PretrainError, run_pretraining
from micl.models import MaskedViT

pytestmark = pytest.mark.e2e


def synthetic(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=96", *overrides)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    # 96 samples / 2 workers / batch 8 = 6 steps per epoch: step 9 is inside epoch 2.
    cfg = synthetic(tmp_path, "optim.epochs=3", "run.max_failures=1", "run.name=killed")
    kill = KillOnce(rank=1, step=9, marker_dir=tmp_path / "faults")
    result = run_pretraining(cfg, hooks=[kill])
    assert kill.marker().exists()  # it did die
    assert result.metrics["epoch"] == 3
    assert result.metrics["restarts"] == 1
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["step"] == 18  # 3 epochs x 6 steps: epoch 2 was redone, not all of training
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("micl-pretrain").experiment_id])
    assert len(runs) == 1  # the restart logged into the same run
    assert "run.inject_fault" not in runs[0].data.params  # no test-only field in the product
    epochs = client.get_metric_history(result.mlflow_run_id, "epoch")
    assert sorted(m.step for m in epochs) == [0, 1, 2, 3]  # epoch 1 not logged twice
    restarts = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id,
                                                                   "restarts")}
    assert restarts == {1: 0, 2: 1, 3: 1}
    # run.keep_last = 2: the checkpoints of epochs 2 and 3 are kept, epoch 1's is deleted. One
    # exception, pinned down here and stated in docs/reference.md: when the kill comes within
    # Ray Train's 2 s poll after a report, the restart resumes from that checkpoint through the
    # storage fallback, and Ray Train, which never registered it, never deletes it either.
    epochs = sorted(torch.load(p / STATE_FILE, weights_only=False)["epoch"]
                    for p in (tmp_path / "runs" / "killed").glob("checkpoint_*") if p.is_dir())
    assert epochs in ([2, 3], [1, 2, 3]), epochs


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = MaskedViT(16, 4, 3, 32, 1, 2)
    path = tmp_path / STATE_FILE
    save_state(path, {"model": model.state_dict(), "epoch": 1})
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_state(path, {"model": model.state_dict(), "epoch": 2})
    assert path.read_bytes() == good  # the previous checkpoint is intact
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1


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


def test_skipped_non_finite_steps_and_an_unreachable_tracking_server(ray_local, tmp_path):
    """Two things a run must survive, in one run: every step non-finite under
    optim.nonfinite=skip (each is skipped and counted, no weight changes), and a tracking
    server that does not answer (a warning, then training without MLflow)."""
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = synthetic(tmp_path, "run.num_workers=1", f"run.tracking_uri=http://127.0.0.1:{port}",
                    "method.temperature=1e-45", "optim.nonfinite=skip", "optim.epochs=1",
                    "run.name=skip")
    with pytest.warns(UserWarning, match="WITHOUT recording"):
        result = run_pretraining(cfg)
    assert result.mlflow_run_id is None
    assert result.metrics["epoch"] == 1 and "knn_top1" in result.metrics
    assert result.metrics["skipped_steps"] == 96 // 8 and result.metrics["step"] == 0
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not state["optimizer"]["state"]  # no step was ever applied
