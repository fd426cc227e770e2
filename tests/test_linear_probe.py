"""The linear probe and the loading of pre-trained encoders (no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from micl.artifacts import export_encoder, load_encoder
from micl.config import ModelConfig, config_from_params, load_config
from micl.data.sources import synthetic_images
from micl.evaluate import extract_features, knn_top1, linear_probe, probe_optimizer
from micl.models import MaskedViT
from micl.models.export import load_timm_encoder
from micl.objectives import check


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in 16-D, far apart along random directions, with a large shared
    offset and scale (what BatchNorm in front of the probe must absorb)."""
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 16, generator=g)
    g.manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    feats = centres[labels] + torch.randn(n, 16, generator=g)
    return 50 + 20 * feats, labels


def test_linear_probe_separates_separable_features():
    train, test = _blobs(300, 1), _blobs(200, 2)
    assert linear_probe(*train, *test, epochs=10) > 0.95
    # Features carrying no label information stay at chance.
    noise = torch.randn(300, 16), train[1]
    assert linear_probe(*noise, torch.randn(200, 16), test[1], epochs=10) < 0.6


def test_the_lars_probe_separates_and_scales_by_trust_ratio():
    train, test = _blobs(300, 1), _blobs(200, 2)
    # LARS moves each weight matrix by lr x 0.001 of its norm per step: it needs MAE-sized
    # learning rates (6.4 there) and steps.
    assert linear_probe(*train, *test, epochs=10, batch_size=32, optimizer="lars", blr=100,
                        warmup_epochs=1) > 0.95
    # At weight decay 0 the weight matrix's step is still scaled by its trust ratio (timm
    # skips it there unless always_adapt), and the bias's is not.
    head = torch.nn.Linear(16, 3)
    opt = probe_optimizer(head, "lars", lr=1.0, weight_decay=0.0)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    head.weight.grad, head.bias.grad = torch.ones_like(head.weight), torch.ones_like(head.bias)
    opt.step()
    ratio = 0.001 * before[0].norm() / head.weight.grad.norm()
    torch.testing.assert_close(before[0] - head.weight.detach(), ratio * torch.ones(3, 16))
    torch.testing.assert_close(before[1] - head.bias.detach(), torch.ones(3))


def test_exported_encoder_loads_back(tmp_path):
    m = ModelConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    ours = MaskedViT.from_config(m).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = export_encoder(ours, m, tmp_path)
    loaded = load_encoder(checkpoint=tmp_path)
    assert loaded.model.dims() == (32, 2, 2) and loaded.config is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x), ours(x))
        timm_model = load_timm_encoder(loaded.model, torch.load(weights)).eval()
        torch.testing.assert_close(timm_model(x), ours(x), rtol=1e-5, atol=1e-5)


def test_config_round_trips_through_mlflow_params():
    # A run logs its config after the method's check: every method field, defaults included
    # (strings, ints, floats, bools and None among them).
    cfg = check(load_config(overrides=["method.name=mimco", "data.mean=[0.2]", "data.std=[0.3]",
                                       "data.path=/data/x", "run.name=run-1",
                                       "optim.clip_grad=1.0", "method.teacher_run_id=0123abc",
                                       "method.decoder_dim=64"]))
    assert cfg.method.args["teacher_checkpoint"] is None and cfg.method.args["decoder_dim"] == 64
    params = {k: str(v) for k, v in cfg.flat().items()}  # what MLflow stores
    params["removed.field"] = "1"  # from another version: ignored
    again = config_from_params(params)
    assert again == cfg
    assert again.method.args["teacher_run_id"] == "0123abc"  # stays a string
    assert check(again) == cfg  # and types back to the same settings
    # A method with bool fields (MAE's norm_pix_loss) round-trips too.
    mae = check(load_config(overrides=["method.name=mae", "method.norm_pix_loss=false"]))
    params = {k: str(v) for k, v in mae.flat().items()}
    assert config_from_params(params) == mae
    assert check(config_from_params(params)).method.args["norm_pix_loss"] is False


# ----------------------------------------------------------------------------- kNN, bf16


def _clusters(n: int, classes: int = 4, dim: int = 32, seed: int = 0):
    centres = torch.nn.functional.normalize(  # the same classes whatever the seed
        torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % classes
    feats = centres[labels] + 0.03 * torch.randn(n, dim, generator=g)  # noise norm ~0.17
    return torch.nn.functional.normalize(feats, dim=1), labels


def test_knn_votes_in_float32_whatever_the_features_dtype():
    bank, bank_labels = _clusters(400)
    query, query_labels = _clusters(100, seed=1)
    assert knn_top1(bank, bank_labels, query, query_labels) == 1.0
    # bf16 features (e.g. kept from an autocast pass): the same answer as their float32 values.
    b16, q16 = bank.bfloat16(), query.bfloat16()
    assert knn_top1(b16, bank_labels, q16, query_labels) == \
        knn_top1(b16.float(), bank_labels, q16.float(), query_labels)


def test_features_under_bf16_autocast_match_float32():
    """The kNN monitor on GPU runs the encoder under bf16 autocast: its features come back
    float32 and rank the bank as the float32 features do."""
    torch.manual_seed(0)
    encoder = MaskedViT(32, 8, 3, 96, 2, 3)
    images, labels = synthetic_images(np.arange(96), 32, 3, 4)
    batches = [{"image": torch.from_numpy(images[i : i + 32]).permute(0, 3, 1, 2),
                "label": torch.from_numpy(labels[i : i + 32])} for i in range(0, 96, 32)]
    ref, ref_labels = extract_features(encoder, batches, [0.5] * 3, [0.25] * 3)
    got, _ = extract_features(encoder, batches, [0.5] * 3, [0.25] * 3,
                              autocast_dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: cosine similarity of each feature to its float32 self
    assert (got * ref).sum(1).min() > 0.99
    knn = [knn_top1(f[:64], ref_labels[:64], f[64:], ref_labels[64:]) for f in (ref, got)]
    assert abs(knn[0] - knn[1]) <= 2 / 32  # at most two of the 32 queries change their vote
