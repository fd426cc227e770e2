"""MAE, MACRL, MimCo (and MiCL) through the real pipeline, plus method-specific unit tests.

End-to-end tests: local Ray, a real TorchTrainer, a real MLflow SQLite store in a temporary
directory, tiny ViTs on tiny synthetic data. The MiCL run (conftest.micl_run) is also the
MimCo teacher and the run the evaluation protocols are tested on. The four methods fit in Ray
Train's local mode (run.num_workers = 0): the same loop, stream, checkpoints and MLflow run in
this process, without the ~20 s of worker start-up and shutdown that add nothing to what these
tests check (methods differ in the loop, not in how workers start; fits with workers:
tests/test_pipeline.py, test_reliability.py); the method defined in a test fits a worker,
since registering in the workers is its point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metric_history, sqlite_uri
from mlflow.tracking import MlflowClient

from micl.artifacts import STATE_FILE, export_encoder, load_encoder, save_state
from micl.config import Config, ConfigError, ModelConfig, load_config
from micl.data.augment import strong_augment
from micl.data.masking import sample_mae_mask
from micl.data.stream import _TrainMapper
from micl.driver import check, evaluate_run, run_pretraining
from micl.models import MaskedViT
from micl.models.decoder import patchify, reconstruction_loss
from micl.objectives import (
    OBJECTIVES,
    build_objective,
    stream_spec,
)
from micl.objectives.losses import patch_info_nce
from micl.train import param_groups
from pipelines.evaluate import main as evaluate_cli

ROOT = Path(__file__).resolve().parents[1]

MODEL = ["model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32",
         "model.depth=2", "model.num_heads=2"]
DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
# Each method's own fields, small (each method rejects the others' fields).
METHOD_ARGS = {
    "micl": ["method.mask_ratio=0.5"],
    "mae": [*DECODER, "method.mask_ratio=0.5"],
    "macrl": [*DECODER, "method.mask_ratio=0.5", "method.strong_mask_ratio=0.75",
              "method.proj_hidden_dim=64", "method.proj_dim=32"],
    "mimco": [*DECODER, "method.mask_ratio=0.5", "method.patch_negatives=batch"],
}
# What each method's MLflow run must record (besides method.name), and its per-term losses.
METHOD_PARAMS = {
    "micl": {"method.kappa": "0.015625", "method.temperature": "0.07"},
    "mae": {"method.decoder_dim": "32", "method.norm_pix_loss": "True"},
    "macrl": {"method.strong_mask_ratio": "0.75", "method.lambda_c": "1.0",
              "method.proj_dim": "32", "method.temperature": "0.2"},
    "mimco": {"method.patch_loss_weight": "1.0", "method.patch_negatives": "batch"},
}
# Whose kNN beats the random encoder's after these 2 tiny epochs (measured: random 0.917 ->
# MiCL 1.0, MimCo 1.0; MACRL 0.958 is one query of 24 away, MAE stays at 0.917: reconstruction
# features need longer before kNN on them improves).
BEATS_RANDOM = {"micl", "mimco"}
METHOD_METRICS = {"micl": set(), "mae": {"loss_rec"}, "macrl": {"loss_contrastive", "loss_rec"},
                  "mimco": {"loss_patch", "loss_image"}}


def method_config(name: str, *overrides: str) -> Config:
    return load_config(overrides=[*MODEL, f"method.name={name}", *METHOD_ARGS[name],
                                  *overrides])


def tiny_config(store: Path, name: str, *overrides: str) -> Config:
    return method_config(
        name, "data.source=synthetic", "data.synthetic_size=96", "data.batch_size=16",
        "data.map_batch_size=16", "data.knn_bank_size=64", "data.knn_query_size=32",
        "data.data_cpus=0.5", "optim.epochs=2", "optim.warmup_epochs=0", "optim.blr=0.02",
        "run.num_workers=1", "run.cpus_per_worker=1", "run.torch_threads=1",
        f"run.storage_path={store / 'runs'}", f"run.tracking_uri={sqlite_uri(store / 'mlflow.db')}",
        *overrides)


@pytest.fixture(scope="module")
def store(pretrain_store) -> Path:
    """The session's store: the MiCL run (conftest.micl_run) is the MimCo teacher there."""
    return pretrain_store


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_method_trains_through_the_pipeline(name, store, request, ray_local):
    if name == "micl":
        cfg, result = request.getfixturevalue("micl_run")
    else:
        extra = []
        if name == "mimco":  # "A MimCo run whose teacher is a MiCL run of the pipeline"
            teacher = request.getfixturevalue("micl_run")[1]
            extra = [f"method.teacher_run_id={teacher.mlflow_run_id}"]
        cfg = tiny_config(store, name, f"run.name={name}-run", "run.num_workers=0", *extra)
        result = run_pretraining(cfg)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2]
    assert all(math.isfinite(m.value) for m in losses)
    assert losses[1].value < losses[0].value, [m.value for m in losses]
    for term in METHOD_METRICS[name]:  # the objective's own loss terms, per epoch
        history = client.get_metric_history(run.info.run_id, term)
        assert sorted(m.step for m in history) == [1, 2], term
        assert all(math.isfinite(m.value) for m in history), term
    if name in BEATS_RANDOM:
        knn = sorted(client.get_metric_history(run.info.run_id, "knn_top1"),
                     key=lambda m: m.step)
        assert knn[0].step == 0 and knn[-1].value > knn[0].value, [m.value for m in knn]
    params = run.data.params
    assert params["method.name"] == name
    for key, value in METHOD_PARAMS[name].items():
        assert params[key] == value, key
    if name == "mimco":
        assert params["method.teacher_run_id"] == cfg.method.args["teacher_run_id"]
    # The exported encoder is the student's, loadable as a timm model; checkpoints hold no
    # frozen teacher.
    assert {a.path for a in client.list_artifacts(run.info.run_id, "encoder")} == {
        "encoder/encoder_timm.pth", "encoder/timm_model.json"}
    state = torch.load(Path(result.checkpoint_path) / STATE_FILE, weights_only=False)
    assert not any(k.startswith("teacher.") for k in state["model"])
    loaded = load_encoder(run_id=result.mlflow_run_id, tracking_uri=result.tracking_uri)
    assert loaded.model.embed_dim == 32 and loaded.epoch == 2


@pytest.mark.e2e
def test_micl_beats_the_random_encoder(micl_run):
    """The point of pre-training: the trained encoder's kNN beats the random one's."""
    _, result = micl_run
    knn = sorted(MlflowClient(result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "knn_top1"), key=lambda m: m.step)
    assert knn[0].step == 0 and knn[-1].value > knn[0].value, [m.value for m in knn]


@pytest.mark.e2e
def test_each_epoch_trains_on_every_sample_once_in_new_batches(micl_run, store):
    """Synthetic data sits in memory in id order: each epoch still trains on every sample once,
    in batches it has not seen before (for MiCL, new negatives), not block after block."""
    cfg, result = micl_run
    steps = [json.loads(line) for line in (store / "micl-steps.jsonl").read_text().splitlines()]
    epochs = {e: [frozenset(ids) for e2, ids in steps if e2 == e] for e in (0, 1)}
    n = cfg.data.synthetic_size
    for batches in epochs.values():
        assert sorted(i for b in batches for i in b) == list(range(n))
    # What a user sees of it without a hook: each epoch's `images` metric is the split's size.
    client = MlflowClient(result.tracking_uri)
    assert metric_history(client, result.mlflow_run_id, "images") == {1: n, 2: n}
    assert not set(epochs[0]) & set(epochs[1])  # no batch of epoch 1 comes back in epoch 2
    spans = [max(b) - min(b) for b in epochs[0]]  # not one block of neighbouring ids
    assert min(spans) > cfg.data.batch_size, spans


@pytest.mark.e2e
def test_evaluate_run_logs_knn_and_linear_to_the_run(micl_run):
    cfg, result = micl_run
    client = MlflowClient(result.tracking_uri)
    trained_knn = sorted(client.get_metric_history(result.mlflow_run_id, "knn_top1"),
                         key=lambda m: m.step)[-1]
    ev = evaluate_run(run_id=result.mlflow_run_id, tracking_uri=result.tracking_uri,
                      linear_epochs=10)
    assert ev.run_id == result.mlflow_run_id and ev.step == cfg.optim.epochs
    assert 0 <= ev.metrics["linear_top1"] <= 1
    # Same sets and (exported) weights as the training loop's last kNN evaluation.
    assert ev.metrics["knn_top1"] == pytest.approx(trained_knn.value, abs=1e-9)
    linear = client.get_metric_history(result.mlflow_run_id, "linear_top1")
    assert [(m.step, m.value) for m in linear] == [(2, ev.metrics["linear_top1"])]
    # The Ray Train checkpoint gives the same encoder; log=False logs nothing.
    from_ckpt = evaluate_run(checkpoint=result.checkpoint_path, protocols=("knn",), log=False)
    assert from_ckpt.run_id is None and set(from_ckpt.metrics) == {"knn_top1"}
    assert from_ckpt.metrics["knn_top1"] == pytest.approx(ev.metrics["knn_top1"], abs=1e-9)
    # Features computed by a Ray Data actor on the cluster (what ImageNet-sized sets use) give
    # the same kNN as in this process.
    on_cluster = evaluate_run(run_id=result.mlflow_run_id, tracking_uri=result.tracking_uri,
                              protocols=("knn",), log=False, extract_workers=1)
    assert on_cluster.bank_size == ev.bank_size and on_cluster.query_size == ev.query_size
    assert on_cluster.metrics["knn_top1"] == pytest.approx(ev.metrics["knn_top1"], abs=1e-9)


@pytest.mark.e2e
def test_evaluate_cli_low_shot_probe_and_a_checkpoint(micl_run, capsys):
    """The CLI's low-shot linear probe (half of the train labels, MAE's LARS optimiser) prints
    and logs `linear_top1_50pct` at the run's last epoch. Given a Ray Train checkpoint and a
    --set instead, it evaluates the same encoder on the changed sets and logs to the run that
    the checkpoint records."""
    _, result = micl_run
    uri, run_id = result.tracking_uri, result.mlflow_run_id
    assert evaluate_cli(["--run-id", run_id, "--protocol", "linear", "--tracking-uri", uri,
                         "--linear-epochs", "5", "--label-fraction", "0.5",
                         "--probe-optimizer", "lars", "--probe-blr", "50",
                         "--probe-batch", "32"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("linear_top1_50pct"))
    printed = float(line.split()[1])
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "linear_top1_50pct")
    assert len(history) == 1 and abs(history[0].value - printed) < 1e-4
    assert history[0].step == 2 and "knn_top1" not in out

    knn_before = len(client.get_metric_history(run_id, "knn_top1"))
    assert evaluate_cli(["--checkpoint", result.checkpoint_path, "--protocol", "knn",
                         "--tracking-uri", uri, "--set", "data.knn_query_size=16"]) == 0
    out = capsys.readouterr().out
    assert "(64 train / 16 test images)" in out and f"logged to MLflow run {run_id} (step 2)" in out
    printed = float(next(x for x in out.splitlines() if x.startswith("knn_top1")).split()[1])
    knn = client.get_metric_history(run_id, "knn_top1")
    assert len(knn) == knn_before + 1
    assert abs(max(knn, key=lambda m: m.timestamp).value - printed) < 1e-4


@pytest.mark.e2e
def test_evaluate_cli_rejects_a_missing_run(tmp_path, capsys):
    assert evaluate_cli(["--run-id", "nope",
                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "nope" in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- a new method


def toy_config(store: Path, *overrides: str) -> Config:
    return tiny_config(store, "toy_views", "run.import_modules=[toy_method]", *overrides)


def test_a_method_defined_in_a_test_checks_its_own_fields(store, toy_registered):
    """tests/toy_method.py: one class and its Args, registered through run.import_modules.
    Its fields are checked like a built-in method's; it trains through the pipeline (local
    mode, then resumed by a Ray Train worker that imports it too) in
    test_pipeline.py::test_parquet_from_a_file_uri_resumes_at_the_next_epoch."""
    with pytest.raises(ConfigError, match=r"method\.logit_scal\b"):
        check(toy_config(store, "method.logit_scal=5"))
    with pytest.raises(ConfigError, match="method.logit_scale"):
        check(toy_config(store, "method.logit_scale=-1"))
    assert check(toy_config(store)).method.args["logit_scale"] == 10.0  # its own default


# ----------------------------------------------------------------------------- MAE


def test_patchify_layout():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)  # [2, 4, 48]
    assert p.shape == (2, 4, 48)
    # Patch 1 = row 0, column 1; pixels as (row, column, channel).
    torch.testing.assert_close(p[1, 1], x[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_counts_only_masked_patches(norm_pix):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    visible, masked = (torch.from_numpy(a) for a in
                       sample_mae_mask(2, 16, 0.75, np.random.default_rng(0)))
    pred = torch.randn(2, masked.shape[1], 48)
    loss = reconstruction_loss(pred, images, masked, 4, norm_pix)

    def repaint(idx: torch.Tensor) -> torch.Tensor:
        """images with new random pixels in the patches idx [2, k]."""
        out = images.clone()
        for b in range(2):
            for i in idx[b].tolist():
                r, c = divmod(i, 4)
                out[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.randn(3, 4, 4)
        return out

    assert reconstruction_loss(pred, repaint(visible), masked, 4, norm_pix) == loss
    assert reconstruction_loss(pred, repaint(masked[:, :1]), masked, 4, norm_pix) != loss
    # MAE's objective predicts exactly the masked patches.
    cfg = method_config("mae", "method.mask_ratio=0.75")
    mae = build_objective(cfg)
    assert mae.decoder(mae.encoder.forward_features(images, visible), visible, masked).shape \
        == pred.shape


# ----------------------------------------------------------------------------- MACRL


def _raw_batch(n: int = 6, size: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": np.arange(n) % 2, "sample_id": np.arange(n) + 100,
            "path": np.full(n, "", dtype=object)}


def test_macrl_stream_gives_two_differently_augmented_and_masked_views():
    cfg = method_config("macrl")
    out = _TrainMapper(cfg, 0, stream_spec(cfg))(_raw_batch())
    assert out["image"].shape == out["image_strong"].shape == (6, 3, 16, 16)
    assert out["image_strong"].dtype == np.uint8
    for b in range(6):  # their own crop and colour: different pixels for every sample
        assert not np.array_equal(out["image"][b], out["image_strong"][b])
    # Weak branch: 50% masked (8 of 16 visible); strong branch: 75% masked (4 visible).
    assert out["visible"].shape == out["masked"].shape == (6, 8)
    assert out["strong_visible"].shape == (6, 4) and out["strong_masked"].shape == (6, 12)
    for vis, hid in ((out["visible"], out["masked"]),
                     (out["strong_visible"], out["strong_masked"])):
        assert all(sorted(set(v) | set(h)) == list(range(16)) for v, h in zip(vis, hid,
                                                                               strict=True))
    again = _TrainMapper(cfg, 0, stream_spec(cfg))(_raw_batch())  # per-sample generators
    assert all(np.array_equal(out[k], again[k]) for k in out)
    # Methods with one view keep one image column.
    micl_cfg = method_config("micl")
    micl = _TrainMapper(micl_cfg, 0, stream_spec(micl_cfg))(_raw_batch())
    assert not any(k.startswith("image_") for k in micl)


def test_strong_augment_is_reproducible_and_keeps_size_and_mode():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
    outs = [np.asarray(strong_augment(img, np.random.default_rng(s))) for s in (5, 5)]
    assert outs[0].shape == (224, 224, 3) and np.array_equal(outs[0], outs[1])
    changed = sum(not np.array_equal(np.asarray(strong_augment(img, np.random.default_rng(s))),
                                     np.asarray(img)) for s in range(50))
    assert changed >= 40  # unchanged with p = 0.2 (no jitter) * 0.8 (no gray) * 0.5 (no blur)
    gray = strong_augment(img.convert("L"), np.random.default_rng(5))
    assert gray.mode == "L" and gray.size == (224, 224)


def test_macrl_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="method.strong_mask_ratio"):
        check(method_config("macrl", "method.strong_mask_ratio=0.25"))
    with pytest.raises(ConfigError, match="method.strong_mask_ratio.*must be >"):
        check(method_config("macrl", "method.strong_mask_ratio=0.5"))  # equal: no asymmetry
    with pytest.raises(ConfigError, match="method.decoder_dim"):
        check(method_config("macrl", "method.decoder_dim=30"))
    with pytest.raises(ConfigError, match="method.lambda_r"):
        check(method_config("macrl", "method.lambda_r=-1"))


# ----------------------------------------------------------------------------- MimCo


def _teacher_checkpoint(tmp_path: Path) -> Path:
    """A Ray Train checkpoint directory of a (tiny, untrained) MiCL run, as micl.train writes."""
    cfg = method_config("micl", "model.embed_dim=48", "model.num_heads=3")
    micl = build_objective(cfg)
    save_state(tmp_path / STATE_FILE, {"model": micl.state_dict(), "epoch": 3, "step": 30,
                                       "config": cfg.to_dict(), "mlflow_run_id": None})
    return tmp_path


def test_mimco_teacher_is_frozen_and_not_checkpointed(tmp_path):
    ckpt = _teacher_checkpoint(tmp_path)
    cfg = method_config("mimco", f"method.teacher_checkpoint={ckpt}")
    obj = build_objective(cfg)
    assert obj.teacher.embed_dim == 48 and obj.encoder.embed_dim == 32  # sizes may differ
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(obj, 0.05), lr=1e-2)  # as the training loop builds it
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in obj.teacher.parameters())
    obj.train()
    assert not obj.teacher.training
    rng = np.random.default_rng(0)
    spec = stream_spec(cfg)
    draws = [spec.draw_masks(rng) for _ in range(8)]
    masks = {k: torch.from_numpy(np.stack([d[k] for d in draws])) for k in draws[0]}
    batch = {"image": torch.randn(8, 3, 16, 16), **masks}
    student_before = obj.encoder.patch_embed.proj.weight.clone()
    for _ in range(3):
        loss, parts = obj(batch)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in obj.teacher.parameters())
        opt.step()
    assert set(parts) == {"loss_patch", "loss_image"}
    for k, v in obj.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(obj.encoder.patch_embed.proj.weight, student_before)
    # The teacher is the checkpoint's encoder.
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(obj.teacher(x), load_encoder(checkpoint=ckpt).encoder(x))
    # Checkpoints hold the student only, and load back strictly.
    state = obj.state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    fresh = build_objective(cfg)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.encoder.cls_token, obj.encoder.cls_token)


def test_mimco_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="method.teacher_run_id"):
        check(method_config("mimco"))
    with pytest.raises(ConfigError, match="method.teacher_checkpoint"):
        check(method_config("mimco", f"method.teacher_checkpoint={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match="method.patch_negatives"):
        check(method_config("mimco", "method.patch_negatives=all",
                            f"method.teacher_checkpoint={tmp_path}"))
    m = ModelConfig(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=1, num_heads=2)
    export_encoder(MaskedViT.from_config(m), m, tmp_path / "grid8")  # 8x8 grid vs 4x4
    cfg = method_config("mimco", f"method.teacher_checkpoint={tmp_path / 'grid8'}")
    with pytest.raises(ConfigError, match="method.teacher_checkpoint.*grid"):
        check(cfg, preflight=True)  # the driver: before Ray starts
    with pytest.raises(ConfigError, match="method.teacher_checkpoint.*grid"):
        build_objective(cfg)


def test_patch_info_nce_negatives():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 8)
    perfect, noisy = patch_info_nce(10 * t, t, 0.1), patch_info_nce(torch.randn(3, 5, 8), t, 0.1)
    assert perfect < 0.1 < noisy
    # One image: "batch" and "image" negatives are the same set.
    torch.testing.assert_close(patch_info_nce(t[:1] + 0.3, t[:1], 0.2, "batch"),
                               patch_info_nce(t[:1] + 0.3, t[:1], 0.2, "image"))
    # More negatives -> a harder task.
    assert patch_info_nce(t + 0.5, t, 0.5, "batch") > patch_info_nce(t + 0.5, t, 0.5, "image")
