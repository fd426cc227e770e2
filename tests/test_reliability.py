"""Failures a long run must survive: bad files, a crash mid-checkpoint, a non-finite loss, a
tracking server that is down. Real Ray processes, real files. A dying worker, and a whole node
lost, are tests/test_multinode.py's cluster run (and, for fine-tuning, test_finetune.py's)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder, metric_history
from test_pipeline import (
    check_checkpoint_loads,
    check_mlflow_run,
    tiny_config,
    write_bad_and_odd_images,
)

from micl.artifacts import STATE_FILE, save_state
from micl.data.sources import load_split
from micl.data.stream import train_stream
from micl.driver import PretrainError, run_pretraining
from micl.models import MaskedViT
from micl.objectives import stream_spec

pytestmark = pytest.mark.e2e


def synthetic(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=96", *overrides)


def test_bad_files_are_skipped_and_counted_in_every_epoch(ray_local, tmp_path):
    """A run over what a real folder throws at it: corrupt, empty, text and truncated files
    (skipped and counted, exactly, in every epoch), odd colour modes (converted), with
    global negatives, gradient accumulation and one kept checkpoint. Local mode: losing a
    worker or a whole node mid-run, with the same settings, is tests/test_multinode.py's
    cluster run."""
    info = make_image_folder(tmp_path / "data", n_per_class=12, size=20, split="train")
    make_image_folder(tmp_path / "data", n_per_class=4, size=20, split="val", bad_files=False)
    convertible, truncated = write_bad_and_odd_images(tmp_path / "data")
    undecodable = len(info["bad"]) + truncated  # corrupt, zero-byte, text, truncated
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={info['root']}",
                      "data.max_bad_fraction=0.2", "method.negatives=global",
                      "optim.grad_accum_steps=2", "run.keep_last=1", "run.num_workers=0",
                      "run.name=folder")
    rows = train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)).take_all()
    assert len(rows) == info["good"] + convertible  # odd modes converted, bad ones dropped
    result = run_pretraining(cfg)
    assert result.metrics["epoch"] == 2 and result.metrics["restarts"] == 0
    client = check_mlflow_run(result, cfg, epochs=2)
    check_checkpoint_loads(result, cfg, client)
    assert client.get_run(result.mlflow_run_id).data.params["method.negatives"] == "global"
    skipped = metric_history(client, result.mlflow_run_id, "skipped")
    assert skipped == {1: undecodable, 2: undecodable}
    # 40 usable images in batches of 8 = 5 micro-batches an epoch; 2 to a step makes 2 steps,
    # and the odd one out is left (an optimizer step never averages fewer micro-batches).
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert len(rows) == 40 and state["step"] == 2 * 2
    assert [p.name for p in (tmp_path / "runs" / "folder").glob("checkpoint_*")] == \
        [Path(result.checkpoint_path).name]  # run.keep_last = 1


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


def test_non_finite_loss_stops_with_a_usable_checkpoint(ray_local, tmp_path):
    # A temperature this small overflows the logits to inf on the first step. Local mode
    # (run.num_workers = 0): the stop is the loop's; how a worker's error reaches the driver
    # is test_a_data_error_in_a_worker_is_one_line_naming_the_files's.
    cfg = synthetic(tmp_path, "method.temperature=1e-45", "run.name=nan", "run.num_workers=0")
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
    # Local mode (run.num_workers = 0): the probe is the driver's, the skipping the loop's.
    cfg = synthetic(tmp_path, "run.num_workers=0", f"run.tracking_uri=http://127.0.0.1:{port}",
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


def test_a_one_worker_run_that_fails_is_retried_from_its_checkpoint(ray_local, tmp_path,
                                                                     toy_registered):
    """One worker trains alone in a Ray task; an error there (a planned one in epoch 2,
    tests/toy_method.py) with run.max_failures = 1 runs the task again, which resumes from
    the epoch-1 checkpoint on storage in the same MLflow run and counts the restart. (A
    worker process killed outright: test_finetune.py's killed worker.)"""
    marker = tmp_path / "failed-once"
    cfg = synthetic(tmp_path, "data.synthetic_size=64", "method.name=toy_views",
                    "run.import_modules=[toy_method]", "method.fail_at_step=12",
                    f"method.fail_marker={marker}", "run.num_workers=1",
                    "run.max_failures=1", "run.name=retried")
    result = run_pretraining(cfg)
    assert marker.exists()  # epoch 2 (steps 9-16) failed once
    assert result.metrics["epoch"] == 2 and result.metrics["restarts"] == 1
    client = check_mlflow_run(result, cfg, epochs=2)  # each epoch logged once
    assert metric_history(client, result.mlflow_run_id, "restarts") == {1: 0, 2: 1}
    steps = metric_history(client, result.mlflow_run_id, "step")
    assert steps == {1: 8, 2: 16}  # epoch 1 not trained again: 8 optimizer steps an epoch
