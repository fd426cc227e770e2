"""End-to-end pre-training on local Ray: real files, a real TorchTrainer, a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from helpers import make_image_folder, sqlite_uri
from mlflow.tracking import MlflowClient
from PIL import Image

from micl.artifacts import (
    STATE_FILE,
    latest_checkpoint_on_storage,
    persist_checkpoint,
    save_state,
)
from micl.config import load_config
from micl.data.clock import held_clocks
from micl.data.prepare import write_parquet_shards
from micl.data.sources import DataError
from micl.driver import run_pretraining, starts_local_ray
from micl.models import MaskedViT
from micl.models.export import load_timm_encoder
from pipelines.pretrain import main as pretrain_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(overrides=[
        "model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "method.mask_ratio=0.5", "data.batch_size=8",
        "data.map_batch_size=16", "data.knn_bank_size=64", "data.knn_query_size=32",
        "optim.epochs=2", "optim.warmup_epochs=1", "optim.blr=1e-3",
        "run.num_workers=2", "run.cpus_per_worker=0.5", "data.data_cpus=0.5",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri={sqlite_uri(tmp_path / 'mlflow.db')}", *overrides])


def check_mlflow_run(result, cfg, epochs: int) -> MlflowClient:
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.mask_ratio"] == str(cfg.method.args["mask_ratio"])
    assert run.data.params["model.embed_dim"] == str(cfg.model.embed_dim)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, epochs + 1))
    knn = client.get_metric_history(run.info.run_id, "knn_top1")
    assert knn and knn[0].step == 0 and knn[-1].step == epochs  # random init, then trained
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
    # into the test's own directory: without a destination MLflow leaves a temp dir behind
    local = client.download_artifacts(result.mlflow_run_id, "encoder/encoder_timm.pth",
                                      cfg.run.storage_path)
    timm_model = load_timm_encoder(cfg.model, torch.load(local)).eval()
    x = torch.randn(3, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), timm_model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fresh(x), MaskedViT.from_config(cfg.model).eval()(x))


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


def test_parquet_from_a_file_uri_resumes_at_the_next_epoch(ray_local, tmp_path, toy_registered):
    """Parquet shards through a file:// URI (any pyarrow filesystem URI goes the same way),
    trained one epoch in local mode (run.num_workers = 0: the loop persists its checkpoint to
    the run directory), then resumed to two with the same run name by one worker (a Ray task
    of its own), next to a newer checkpoint directory that a crash cut short: the resume
    takes the newest complete checkpoint on storage, not the half-written one. The method is
    one defined outside micl (tests/toy_method.py, one class and its Args), which the worker
    imports through run.import_modules, as a user's own method would be."""
    info = make_image_folder(tmp_path / "folder", n_per_class=12, size=40, split="train")
    make_image_folder(tmp_path / "folder", n_per_class=4, size=40, split="val", bad_files=False)
    write_parquet_shards(info["root"], str(tmp_path / "shards"), size=24, rows_per_shard=10,
                         log=lambda _: None)

    def cfg(epochs: int, workers: int):
        return tiny_config(tmp_path, "data.source=parquet",
                           f"data.path={(tmp_path / 'shards').as_uri()}", "run.name=resumable",
                           "method.name=toy_views", "run.import_modules=[toy_method]",
                           "method.logit_scale=5",
                           f"run.num_workers={workers}", f"optim.epochs={epochs}",
                           "optim.warmup_epochs=0")

    first = run_pretraining(cfg(1, workers=0))
    assert first.run_name == "resumable" and first.metrics["epoch"] == 1
    assert first.metrics["skipped"] == 0  # prepare_data already dropped the bad files
    first_state = torch.load(Path(first.checkpoint_path) / STATE_FILE, weights_only=False)
    # What a crash during the next checkpoint leaves behind: a directory with a truncated
    # state file.
    broken = tmp_path / "runs" / "resumable" / "checkpoint_2099-01-01_00-00-00.000000"
    broken.mkdir()
    (broken / "state.pt.tmp").write_bytes(b"\x80\x02truncated")
    seen = tmp_path / "where"

    def note_process(info) -> None:  # each step: in a Ray worker? an actor? holding what?
        ctx = ray.get_runtime_context()  # and which of micl's helper actors are up
        helpers = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == "micl")
        with seen.open("a") as f:
            f.write(json.dumps([ctx.worker.mode == ray.WORKER_MODE, ctx.get_actor_id(),
                                ctx.get_assigned_resources(), len(helpers),
                                ctx.get_task_name()]) + "\n")

    second = run_pretraining(cfg(2, workers=1), hooks=[note_process])
    assert second.mlflow_run_id == first.mlflow_run_id  # one MLflow run across the resume
    # One worker trains alone in a Ray task that holds the worker's CPUs: not in this
    # process, and not in a Ray Train worker (an actor, which starts with a controller and
    # helper actors: five processes a fit), named for the run where Ray lists tasks. micl's
    # own helper is one actor: this process's epoch clocks (each relays its fit's console).
    where = {line for line in seen.read_text().splitlines()}
    assert where == {json.dumps([True, None, {"CPU": cfg(2, 1).run.cpus_per_worker}, 1,
                                 "micl-fit:resumable"])}, where
    assert second.metrics["epoch"] == 2
    state = torch.load(Path(second.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["step"] == first_state["step"] * 2  # epoch 2 added to epoch 1's steps
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {state["step"]}
    client = check_mlflow_run(second, cfg(2, 1), epochs=2)  # no epoch logged twice
    check_checkpoint_loads(second, cfg(2, 1), client)
    run = client.get_run(second.mlflow_run_id)
    assert run.data.params["method.name"] == "toy_views"
    assert run.data.params["method.logit_scale"] == "5.0" and "loss_toy" in run.data.metrics
    # The method's after_step ran once per optimizer step, in both fits: its step counter is
    # a buffer, checkpointed and resumed with the model.
    assert int(state["model"]["steps_seen"]) == state["step"]


def test_local_mode_persists_checkpoints_and_resumes(ray_local, tmp_path):
    """run.num_workers = 0 runs the loop in this process (Ray Train's local mode: for a
    debugger, and short runs without worker start-up). Ray Train keeps no checkpoint there, so
    the loop persists each one to the run directory itself, keeps run.keep_last of them, and a
    second fit with the same name resumes from the newest; this process's torch threads are
    left as they were, and neither fit's epoch clock outlives it."""
    def cfg(epochs: int):
        return tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=64",
                           "run.num_workers=0", "run.keep_last=1", "run.torch_threads=1",
                           "run.name=local", f"optim.epochs={epochs}")

    threads = torch.get_num_threads()
    first = run_pretraining(cfg(1))
    run_dir = tmp_path / "runs" / "local"
    assert first.metrics["epoch"] == 1 and Path(first.checkpoint_path).parent == run_dir
    first_step = torch.load(Path(first.checkpoint_path) / STATE_FILE, weights_only=False)["step"]
    second = run_pretraining(cfg(2))
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["epoch"] == 2
    state = torch.load(Path(second.checkpoint_path) / STATE_FILE, weights_only=False)
    assert state["step"] == 2 * first_step  # epoch 2 on top of epoch 1, not from scratch
    # The optimizer's state came back too: AdamW counts every step of both fits.
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {state["step"]}
    assert [p.name for p in run_dir.glob("checkpoint_*")] == [Path(second.checkpoint_path).name]
    check_checkpoint_loads(second, cfg(2), check_mlflow_run(second, cfg(2), epochs=2))
    assert torch.get_num_threads() == threads
    # Each fit's epoch clock goes with it: this process's clocks actor, which outlives the
    # fits, holds none (tests run one fit at a time, so no other test's clock is there).
    assert held_clocks() == []


def test_the_storage_fallback_takes_the_newest_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    for name, files in [("checkpoint_2026-01-01_00-00-00.000001", {STATE_FILE: b"old"}),
                        ("checkpoint_2026-01-02_00-00-00.000001", {STATE_FILE: b"new"}),
                        ("checkpoint_2026-01-03_00-00-00.000001", {"state.pt.tmp": b"cut"}),
                        ("not_a_checkpoint", {STATE_FILE: b"x"})]:
        (run_dir / name).mkdir(parents=True)
        for file, data in files.items():
            (run_dir / name / file).write_bytes(data)
    found = latest_checkpoint_on_storage(str(run_dir))
    assert Path(found.path).name == "checkpoint_2026-01-02_00-00-00.000001"
    assert latest_checkpoint_on_storage(run_dir.as_uri()).path.endswith(
        "checkpoint_2026-01-02_00-00-00.000001")  # the same through a file:// URI
    assert latest_checkpoint_on_storage(str(tmp_path / "missing")) is None


def test_persist_checkpoint_keeps_the_newest_complete_ones(tmp_path):
    """Local mode's own checkpoint keeping: the new checkpoint and the newest keep_last - 1
    complete others stay, whatever directories a crash cut short (even newer-named ones)."""
    run_dir, src = tmp_path / "run", tmp_path / "src"
    src.mkdir()
    cut = run_dir / "checkpoint_2099-01-01_00-00-00.000000"  # newer name, no state file
    cut.mkdir(parents=True)
    (cut / "state.pt.tmp").write_bytes(b"cut")
    kept = []
    for epoch in (1, 2, 3):
        save_state(src / STATE_FILE, {"epoch": epoch})
        kept.append(Path(persist_checkpoint(src, str(run_dir), keep_last=2).path))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([kept[1].name, kept[2].name,
                                                                 cut.name])
    assert torch.load(kept[2] / STATE_FILE)["epoch"] == 3
    assert latest_checkpoint_on_storage(str(run_dir)).path == str(kept[2])


def test_missing_and_empty_paths_fail_before_training(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={tmp_path / 'nope'}",
                      "run.name=nope")
    with pytest.raises(DataError, match="nope"):
        run_pretraining(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("micl-pretrain").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING
    (tmp_path / "empty" / "train").mkdir(parents=True)
    cfg = tiny_config(tmp_path, "data.source=imagefolder", f"data.path={tmp_path / 'empty'}")
    with pytest.raises(DataError, match="empty"):
        run_pretraining(cfg)


# A method field's typo is found once torch and the method registry are imported: in a fresh
# process, nothing of theirs may reach stderr either.
@pytest.mark.parametrize(("override", "field", "fresh_process"), [
    ("method.mask_ratio=1.5", "method.mask_ratio", False),
    ("model.img_size=30", "model.img_size", True),
    ("method.mask_ration=0.5", "method.mask_ration", True),
])
def test_cli_config_error_is_one_clear_line(override, field, fresh_process, capsys):
    if fresh_process:  # everything the user would see, warnings of imports included
        proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pretrain.py"),
                               "--set", override], capture_output=True, text=True, timeout=120)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = pretrain_cli(["--set", override]), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], err


@ray.remote
class CpuHolder:  # holds CPUs for as long as it lives, as a fit's trainer and tasks do
    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
def worker_pid() -> int:
    return os.getpid()


def test_a_local_ray_keeps_an_idle_task_process_for_the_next_epoch(ray_local):
    """The next epoch's decode tasks find the last epoch's worker processes. Ray ends an idle
    worker process after 1 s when a node has fewer free CPUs than idle workers, as it has
    while a fit holds them; each epoch's tasks then started Python and their imports again.
    micl's local Ray keeps them 60 s (driver.IDLE_WORKER_KEEP_MS)."""
    holder = CpuHolder.options(num_cpus=2).remote()  # the session Ray's two CPUs
    ray.get(holder.pid.remote(), timeout=120)
    pid = ray.get(worker_pid.remote())
    time.sleep(3)  # a pause between epochs: kNN evaluation, checkpoint
    try:
        assert Path(f"/proc/{pid}").exists(), "the idle task process was ended"
    finally:
        ray.kill(holder)


def test_which_addresses_start_a_local_ray(monkeypatch):
    # A local Ray gets the workers' path through the environment (no runtime env): only
    # where Ray itself would start one; joining a cluster keeps the runtime env.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_local_ray("local")
    assert not starts_local_ray("127.0.0.1:6379")
    assert not starts_local_ray("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets
    assert not starts_local_ray(None)
