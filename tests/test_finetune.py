"""Fine-tuning: the model and its export against timm, the optimiser groups, the checks that
run before Ray, and two real fine-tuning runs through the pipeline (from the session's MiCL
pre-training run with a killed worker, and from scratch through the CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import KillOnce, sqlite_uri
from mlflow.tracking import MlflowClient
from PIL import Image
from timm.optim import param_groups_layer_decay

from micl.artifacts import export_encoder, load_encoder
from micl.config import ConfigError, load_config
from micl.data.augment import RandAugment
from micl.data.stream import label_subset, subset_suffix
from micl.finetune import (
    CLASSIFIER_JSON,
    CLASSIFIER_WEIGHTS,
    Classifier,
    architecture,
    check_finetune,
    export_classifier,
    layer_decay_groups,
    run_finetuning,
)
from micl.models import MaskedViT
from micl.models.classifier import create_classifier, load_encoder_weights
from micl.models.export import timm_state_dict
from micl.tracking import FINETUNE_RUN_TAG, PRETRAIN_RUN_TAG

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32",
         "model.depth=2", "model.num_heads=2"]  # the session's MiCL run (test_objectives)


def ft_config(store: Path, *overrides: str):
    return load_config(overrides=[*ft_config_overrides(store), *overrides])


def encoder_and_classifier(global_pool: str):
    cfg = load_config(overrides=MODEL)
    encoder = MaskedViT.from_config(cfg.model).eval()
    net = create_classifier(cfg.model, num_classes=5, global_pool=global_pool)
    load_encoder_weights(net, timm_state_dict(encoder))
    return cfg, encoder, net.eval()


# ----------------------------------------------------------------------------- the model


def test_the_classifier_starts_from_the_encoder():
    """With the cls token the classifier's pre-logits are the encoder's features; with average
    pooling its tokens are, before the new fc_norm. The head starts near zero (std 2e-5)."""
    x = torch.randn(3, 3, 16, 16)
    _, encoder, net = encoder_and_classifier("token")
    with torch.no_grad():
        pre = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(pre, encoder(x), atol=1e-5)
        assert net.head.weight.abs().max() < 1e-4 and not net.head.bias.any()
    _, encoder, net = encoder_and_classifier("avg")
    with torch.no_grad():  # the final norm gives way to fc_norm after the pooling
        tokens = encoder.norm(net.forward_features(x))
        assert torch.allclose(tokens, encoder.forward_tokens(encoder.embed_patches(x)),
                              atol=1e-5)


def test_encoder_weights_of_another_size_are_refused():
    cfg = load_config(overrides=MODEL)
    net = create_classifier(cfg.model, num_classes=5)
    bigger = MaskedViT(16, 4, 3, 64, 2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder_weights(net, timm_state_dict(bigger))


def test_the_exported_classifier_loads_into_timm_with_the_same_logits(tmp_path):
    cfg, _, net = encoder_and_classifier("avg")
    with torch.no_grad():
        net.head.weight.normal_()  # a head that matters
    export_classifier(net, cfg.model, 5, "avg", tmp_path)
    meta = json.loads((tmp_path / CLASSIFIER_JSON).read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(torch.load(tmp_path / CLASSIFIER_WEIGHTS, weights_only=True),
                          strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), net(x))


def test_layer_decay_groups_are_timms_with_maes_scales():
    cfg = load_config(overrides=[*MODEL, "finetune.layer_decay=0.5"])
    net = create_classifier(cfg.model, num_classes=5)
    ours = layer_decay_groups(net, cfg)
    theirs = param_groups_layer_decay(net, weight_decay=cfg.optim.weight_decay,
                                      no_weight_decay_list=net.no_weight_decay(),
                                      layer_decay=0.5)

    def summary(groups):
        return sorted((g["lr_scale"], g["weight_decay"], sorted(id(p) for p in g["params"]))
                      for g in groups)

    assert summary(ours) == summary(theirs)
    names = {id(p): n for n, p in net.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in ours for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in ours for p in g["params"]}
    assert set(scale) == set(names.values())  # every parameter exactly once
    # depth 2: head 1, block 1 0.5, block 0 0.25, the embeddings 0.125 (MAE's layer ids)
    assert scale["head.weight"] == 1 and scale["fc_norm.weight"] == 1
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.125
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert decay["pos_embed"] == decay["cls_token"] == decay["blocks.0.norm1.weight"] == 0
    assert decay["head.bias"] == 0


def test_the_criterion_mixes_erases_and_smooths():
    cfg = load_config(overrides=[*MODEL, "finetune.reprob=1.0"])
    net = create_classifier(cfg.model, num_classes=4)
    model = Classifier(net, cfg, 4)
    batch = {"image": torch.randn(6, 3, 16, 16), "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    loss, _ = model.train()(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert net.head.weight.grad is not None
    with torch.no_grad():
        eval_loss, _ = model.eval()(batch)  # eval: plain smoothed cross entropy, no mixing
        logits = net(batch["image"])
    expected = torch.nn.functional.cross_entropy(logits, batch["label"], label_smoothing=0.1)
    assert eval_loss == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(AssertionError):  # timm's Mixup pairs image i with image B-1-i
        model.train()({"image": torch.randn(5, 3, 16, 16), "label": torch.zeros(5).long()})


def test_randaugment_is_reproducible_and_keeps_the_mode():
    aug = RandAugment("rand-m9-mstd0.5-inc1", 28, [0.286])
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8))
    outs = [np.asarray(aug(gray, np.random.default_rng(s))) for s in (1, 1, 2)]
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    assert outs[0].shape == (28, 28)
    for seed in range(200):  # every op at every magnitude works on this Pillow (posterize)
        aug(gray, np.random.default_rng(seed))


def test_low_shot_subsets_are_fixed_nested_and_sized():
    ids = np.arange(50_000)
    one, ten = label_subset(ids, 0.01, 0), label_subset(ids, 0.1, 0)
    assert abs(one.sum() - 500) < 100 and abs(ten.sum() - 5000) < 300
    assert not (one & ~ten).any()  # the 1% subset lies inside the 10% one
    assert np.array_equal(label_subset(ids[::-1], 0.1, 0), ten[::-1])  # order does not matter
    assert (label_subset(ids, 0.1, 1) != ten).any()  # the seed picks another subset
    assert subset_suffix(0.01) == "_1pct" and subset_suffix(0.1) == "_10pct"
    assert subset_suffix(1.0) == ""


# ----------------------------------------------------------------------------- before Ray


def test_bad_input_is_refused_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size = 7: Mixup"):
        check_finetune(ft_config(tmp_path, "finetune.mixup=0.8", "data.batch_size=7"))
    with pytest.raises(ConfigError, match="finetune.num_classes = 10: the data .* has 4 classes"):
        check_finetune(ft_config(tmp_path, "finetune.num_classes=10"))
    with pytest.raises(ConfigError, match="finetune.init = 'no-such-thing'"):
        check_finetune(ft_config(tmp_path, "finetune.init=no-such-thing"))
    with pytest.raises(ConfigError, match="MLflow run '0123456789abcdef0123456789abcdef' not"):
        check_finetune(ft_config(tmp_path, "finetune.init=0123456789abcdef0123456789abcdef"))
    bigger = load_config(overrides=[*MODEL, "model.embed_dim=64"]).model
    export_encoder(MaskedViT.from_config(bigger), bigger, tmp_path / "enc")
    with pytest.raises(ConfigError, match="model.*embed_dim 64.*embed_dim 32"):
        check_finetune(ft_config(tmp_path, f"finetune.init={tmp_path / 'enc'}"))
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        ft_config(tmp_path, "finetune.layer_decay=0")
    with pytest.raises(ConfigError, match="finetune.randaug"):
        ft_config(tmp_path, "finetune.randaug=m9")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_finetune_from_a_pretraining_run_survives_a_killed_worker(micl_run, tmp_path):
    """A worker starts from the session's MiCL run and dies in epoch 2 (96 samples / batch 8 =
    12 steps an epoch); the fit resumes from the epoch-1 checkpoint and ends at epoch 3. The
    runs are linked both ways and the classifier is exported. One worker: a restarted group of
    two is the pre-training reliability test's subject (tests/test_reliability.py)."""
    _, pre = micl_run
    store = Path(pre.tracking_uri.removeprefix("sqlite:///")).parent
    cfg = ft_config(store, f"finetune.init={pre.mlflow_run_id}", "run.num_workers=1",
                    "run.cpus_per_worker=0.5", "run.max_failures=1", "run.name=ft-killed")
    kill = KillOnce(rank=0, step=15, marker_dir=tmp_path / "faults")
    result = run_finetuning(cfg, hooks=[kill])
    assert kill.marker().exists()
    assert result.metrics["epoch"] == 3 and result.metrics["restarts"] == 1
    assert result.pretrain_run_id == pre.mlflow_run_id
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "micl-finetune"
    assert run.data.tags[PRETRAIN_RUN_TAG] == pre.mlflow_run_id
    assert run.data.params["finetune.layer_decay"] == "0.75"
    assert not any(k.startswith("method.") for k in run.data.params)
    val = sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)
    assert [m.step for m in val] == [1, 2, 3]  # no epoch logged twice after the restart
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert losses[-1].value < losses[0].value, [m.value for m in losses]
    assert val[-1].value > 0.5  # 4 classes: chance is 0.25
    back = client.get_run(pre.mlflow_run_id)
    assert back.data.tags[FINETUNE_RUN_TAG] == result.mlflow_run_id
    assert back.data.metrics["finetune_top1"] == pytest.approx(result.metrics["val_top1"])
    local = Path(client.download_artifacts(run.info.run_id, "classifier", str(tmp_path)))
    meta = json.loads((local / CLASSIFIER_JSON).read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(torch.load(local / CLASSIFIER_WEIGHTS, weights_only=True), strict=True)


@pytest.mark.e2e
def test_finetune_cli_from_scratch(ray_local, tmp_path, capsys):
    """The supervised baseline through the command line, on a low-shot half of the data."""
    from pipelines.finetune import main

    # Local mode (run.num_workers = 0): workers are the killed-worker test's subject.
    overrides = [*ft_config_overrides(tmp_path), "finetune.label_fraction=0.5",
                 "run.num_workers=0"]
    code = main(["--init", "scratch", *[a for o in overrides for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert code == 0, out
    top1 = float(next(x for x in out.splitlines() if x.startswith("val top-1")).split()[2])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("micl-finetune").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["micl.init"] == "scratch"
    assert PRETRAIN_RUN_TAG not in runs[0].data.tags
    assert runs[0].data.metrics["val_top1"] == pytest.approx(top1, abs=1e-4)
    losses = sorted(client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: m.step)
    assert len(losses) == 3 and all(math.isfinite(m.value) for m in losses)
    assert losses[-1].value < losses[0].value, [m.value for m in losses]
    # About 48 of 96 images: 3 epochs of ~6 steps of 8, not 3 x 12 steps on all of them.
    assert 9 <= runs[0].data.metrics["step"] <= 27


def ft_config_overrides(store: Path) -> list[str]:
    return [*MODEL, "data.source=synthetic", "data.synthetic_size=96", "data.batch_size=8",
            "data.map_batch_size=16", "data.data_cpus=0.5", "data.crop_scale_min=0.5",
            "optim.epochs=3", "optim.warmup_epochs=0", "optim.blr=0.02", "finetune.mixup=0",
            "finetune.cutmix=0", "finetune.eval_crop_pct=1.0", "finetune.drop_path=0",
            "run.num_workers=1", "run.torch_threads=1", f"run.storage_path={store / 'runs'}",
            f"run.tracking_uri={sqlite_uri(store / 'mlflow.db')}"]


@pytest.mark.parametrize(("name", "recipe"), [
    ("vitb16", {"model.name": "vit_base", "optim.blr": 5e-4, "optim.epochs": 100,
                "finetune.layer_decay": 0.65, "finetune.drop_path": 0.1}),
    ("vitl16", {"model.name": "vit_large", "optim.blr": 1e-3, "optim.epochs": 50,
                "finetune.layer_decay": 0.75, "finetune.drop_path": 0.2})])
def test_imagenet_configs_carry_maes_recipe(name, recipe):
    cfg = load_config(ROOT / f"configs/finetune_imagenet_{name}.yaml")
    flat = cfg.flat()
    for key, value in recipe.items():
        assert flat[key] == value, key
    assert cfg.data.batch_size * cfg.run.num_workers * cfg.optim.grad_accum_steps == 1024
    assert (cfg.model.img_size, cfg.model.patch_size) == (224, 16)
    assert (cfg.optim.warmup_epochs, cfg.optim.min_lr, cfg.optim.weight_decay) == (5, 1e-6, 0.05)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.data.crop_scale_min) == (0.9, 0.999, 0.08)
    f = cfg.finetune
    assert (f.randaug, f.reprob, f.mixup, f.cutmix, f.label_smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert (f.global_pool, f.head_init_std, f.eval_crop_pct) == ("avg", 2e-5, 0.875)


def test_the_fashion_mnist_config_fits_the_pretraining_configs():
    """Fine-tuning needs the encoder's architecture: the CPU config's is the demo's."""
    ft = load_config(ROOT / "configs/finetune_fashion_mnist.yaml")
    for pre in ("fashion_mnist_quality", "fashion_mnist_mae"):
        assert load_config(ROOT / f"configs/{pre}.yaml").model == ft.model, pre


def test_an_encoder_is_matched_by_its_architecture_not_its_size_name(tmp_path):
    """A vit_pico exports as timm's vit_tiny with pico's dimensions and comes back named
    vit_tiny: fine-tuning it with the pico config it was trained with must be accepted."""
    pico = load_config(overrides=["model.name=vit_pico", "model.img_size=32",
                                  "model.patch_size=8"]).model
    export_encoder(MaskedViT.from_config(pico), pico, tmp_path)
    loaded = load_encoder(checkpoint=str(tmp_path / "encoder_timm.pth")).model
    assert architecture(loaded) == architecture(pico)
    tiny = load_config(overrides=["model.name=vit_tiny", "model.img_size=32",
                                  "model.patch_size=8"]).model
    assert architecture(loaded) != architecture(tiny)
