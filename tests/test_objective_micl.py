import copy
import dataclasses
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_ranks

from micl.artifacts import export_encoder
from micl.config import Config, ConfigError, ModelConfig, load_config
from micl.driver import check
from micl.models import MaskedViT
from micl.objectives import OBJECTIVES, build_objective, stream_spec
from micl.objectives.losses import info_nce, micl_loss, patch_info_nce, tvmf_similarity
from micl.objectives.micl import MiCLArgs
from micl.train import param_groups, train_step

Z1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
Z2 = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])


def test_loss_matches_hand_computation():
    kappa, tau = 1 / 64, 0.07
    # Written out with Python floats, independently of the implementation.
    dot = lambda u, v: sum(a * b for a, b in zip(u, v, strict=True))  # noqa: E731
    cos = [[dot(u, v) for v in Z2.tolist()] for u in Z1.tolist()]
    sim = [[0.5 * (1 + c) / (1 + kappa * (1 - c)) / tau for c in row] for row in cos]

    def ce(rows):
        return sum(math.log(sum(math.exp(x) for x in r)) - r[i] for i, r in enumerate(rows)) / 3

    expected = 0.5 * (ce(sim) + ce([list(col) for col in zip(*sim, strict=True)]))
    got = micl_loss(Z1, Z2, kappa, tau).item()
    assert abs(got - expected) < 1e-6 * max(1, abs(expected))


def test_loss_is_symmetric_and_scale_invariant():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(micl_loss(a, b, 1 / 64, 0.07), micl_loss(b, a, 1 / 64, 0.07))
    torch.testing.assert_close(micl_loss(3 * a, b, 1 / 64, 0.07), micl_loss(a, b, 1 / 64, 0.07))


def test_kappa_zero_is_cosine_infonce_at_twice_the_temperature():
    torch.manual_seed(1)
    a, b = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    tau = 0.1
    c = a @ b.T
    # The logits differ by the constant 1/(2 tau), which softmax ignores.
    torch.testing.assert_close(tvmf_similarity(c, 0.0, tau), c / (2 * tau) + 1 / (2 * tau))
    labels = torch.arange(6)
    ce = F.cross_entropy
    infonce = 0.5 * (ce(c / (2 * tau), labels) + ce(c.T / (2 * tau), labels))
    torch.testing.assert_close(micl_loss(a, b, 0.0, tau), infonce)
    assert (micl_loss(a, b, 1e-9, tau) - infonce).abs() < 1e-5


def test_kappa_sharpens_the_similarity():
    c = torch.linspace(-1, 1, 11)
    s0, s1 = tvmf_similarity(c, 0.0, 1.0), tvmf_similarity(c, 1.0, 1.0)
    assert torch.allclose(s0[-1], s1[-1])  # same value at c = 1
    assert (s1[1:-1] < s0[1:-1]).all()  # heavier penalty away from c = 1 (both 0 at c = -1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_worker(rank, world, port, a, b, w, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = a.shape[0] // world
        lin = torch.nn.Linear(a.shape[1], 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        sl = slice(rank * half, (rank + 1) * half)
        loss = micl_loss(lin(a[sl]), lin(b[sl]), 1 / 64, 0.07, negatives="global")
        loss.backward()
        # What DDP does: average parameter gradients (and we average the reported loss).
        grad = lin.weight.grad.clone()
        dist.all_reduce(grad)
        value = loss.detach().clone()
        dist.all_reduce(value)
        if rank == 0:
            out[0] = value.item() / world
            out[1:] = (grad / world).flatten()
    finally:
        dist.destroy_process_group()


def test_global_negatives_on_two_processes_equal_local_on_the_whole_batch():
    torch.manual_seed(0)
    a, b, w = torch.randn(8, 6), torch.randn(8, 6), torch.randn(4, 6)
    lin = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = micl_loss(lin(a), lin(b), 1 / 64, 0.07, negatives="local")
    ref.backward()
    out = torch.zeros(1 + w.numel()).share_memory_()
    run_ranks(_global_worker, args=(2, _free_port(), a, b, w, out))
    assert abs(out[0].item() - ref.item()) < 1e-5
    torch.testing.assert_close(out[1:].reshape(4, 6), lin.weight.grad, rtol=1e-5, atol=1e-6)


def _teacher_overrides(name, tmp_path, patch_size=4):
    """MimCo needs a frozen teacher: a small exported encoder (narrower than the student)."""
    if name != "mimco":
        return []
    m = ModelConfig(img_size=28, patch_size=patch_size, in_chans=1, embed_dim=32, depth=1,
                    num_heads=2)
    return [f"method.teacher_checkpoint={export_encoder(MaskedViT.from_config(m), m, tmp_path)}"]


# Small settings for every method; each method gets the ones it has (a field another method
# owns is an error: test_a_field_of_another_method_is_named_with_the_method in test_config).
SMALL = {"mask_ratio": 0.5, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4,
         "proj_hidden_dim": 128}


def _small_overrides(name):
    fields = {f.name for f in dataclasses.fields(OBJECTIVES[name].Args)}
    return [f"method.{k}={v}" for k, v in SMALL.items() if k in fields]


def _batch(cfg, n, rng):
    """A training batch as the stream gives it (after to_device): one normalised image column
    per view of the method's stream spec, and its masks drawn per sample and stacked."""
    spec = stream_spec(cfg)
    draws = [spec.draw_masks(rng) for _ in range(n)]  # per sample: {name: int64 [k]}
    masks = {k: torch.from_numpy(np.stack([d[k] for d in draws])) for k in draws[0]}
    assert all(m.dtype == torch.int64 and m.shape[0] == n for m in masks.values())
    images = {col: torch.randn(n, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
              for col in spec.views}  # macrl: 2 views
    return {**images, **masks}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_trains_a_step(name, tmp_path):
    cfg = check(load_config(overrides=[f"method.name={name}", "model.depth=2",
                                       "model.embed_dim=64", "model.num_heads=4",
                                       *_small_overrides(name),
                                       *_teacher_overrides(name, tmp_path)]))
    obj = build_objective(cfg)
    assert obj.args.mask_ratio == 0.5  # typed access to the method's settings
    batch = _batch(cfg, 8, np.random.default_rng(0))
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss, _ = obj(batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- bf16 numerics


def _aligned_pair(n, d, noise, seed=0):
    """[n, d] embeddings whose positives are close (as after some training): the logits of the
    positives are large, where bf16 rounding (8-bit mantissa) hurts a softmax most."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    return z1, z1 + noise * torch.randn(n, d, generator=g)


def _loss_and_grads(loss_fn, xs, autocast):
    xs = [x.clone().requires_grad_() for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(*xs)
    assert loss.dtype == torch.float32
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


@pytest.mark.parametrize(("name", "loss_fn", "shape"), [
    # Before the losses were forced to float32, bf16 autocast moved the MiCL loss of these
    # embeddings by ~2% (and its gradients by ~2%), InfoNCE's by ~2e-4 (gradients ~4e-3).
    ("micl", lambda a, b: micl_loss(a, b, 1 / 64, 0.07), (128, 64)),
    ("micl_kappa0_t0.025", lambda a, b: micl_loss(a, b, 0.0, 0.025), (128, 64)),
    ("info_nce", lambda a, b: info_nce(a, b, 0.2), (128, 64)),
    ("info_nce_one_way", lambda a, b: info_nce(a, b, 0.2, symmetric=False), (128, 64)),
    ("patch_info_nce_batch", lambda a, b: patch_info_nce(a, b, 0.2, "batch"), (8, 16, 64)),
    ("patch_info_nce_image", lambda a, b: patch_info_nce(a, b, 0.2, "image"), (8, 16, 64)),
])
def test_losses_under_bf16_autocast_equal_float32(name, loss_fn, shape):
    z1, z2 = _aligned_pair(math.prod(shape[:-1]), shape[-1], noise=1.0)
    z1, z2 = z1.reshape(shape), z2.reshape(shape)
    ref, ref_grads = _loss_and_grads(loss_fn, (z1, z2), autocast=False)
    got, grads = _loss_and_grads(loss_fn, (z1, z2), autocast=True)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()), (got.item(), ref.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert ((g - r).norm() / r.norm()).item() <= 1e-4
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_a_micl_step_under_bf16_autocast_matches_float32():
    cfg = check(load_config(overrides=["model.patch_size=7", "model.embed_dim=64",
                                       "model.depth=2", "model.num_heads=4",
                                       "method.mask_ratio=0.25"]))
    torch.manual_seed(0)
    obj = build_objective(cfg)
    batch = _batch(cfg, 32, np.random.default_rng(0))
    results, grads = {}, {}
    for dtype in (None, torch.bfloat16):
        model = copy.deepcopy(obj)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss, _ = model(batch)
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()
                                  if p.grad is not None])
        model.zero_grad()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        results[dtype] = train_step(model, opt, [batch], autocast_dtype=dtype)
        assert results[dtype].finite and results[dtype].images == 32
        assert results[dtype].loss.item() == pytest.approx(loss.item(), rel=1e-6)
    ref, got = results[None].loss.item(), results[torch.bfloat16].loss.item()
    # The encoder's matmuls run in bf16 (unit roundoff 2^-9, about 2e-3 per rounding), so the
    # embeddings, and with them the loss, carry errors of order 1e-3 relative (measured: 4e-4
    # at this size); the loss itself is float32. 2e-2 leaves room for other seeds and kernels
    # while still failing a step whose numerics are broken (a wrong cast, a loss in bf16 at
    # large logits: ~2% in the test above).
    assert got == pytest.approx(ref, rel=2e-2)
    assert F.cosine_similarity(grads[None], grads[torch.bfloat16], dim=0) > 0.99


# ----------------------------------------------------------------------------- the registry


def test_every_method_checks_its_own_defaults(tmp_path):
    cfg = Config()  # 28 px, patch 4: 49 patches
    teacher = ModelConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1,
                          num_heads=2)
    weights = export_encoder(MaskedViT.from_config(teacher), teacher, tmp_path / "teacher")
    assert weights.is_file()
    defaults = {}
    for name, cls in OBJECTIVES.items():
        args = cls.Args()
        if name == "mimco":
            assert args.teacher_checkpoint is None and args.teacher_run_id is None
            with pytest.raises(ConfigError, match="method.teacher_run_id"):
                args.check(cfg)  # a teacher is the one setting without a default
            args.teacher_checkpoint = str(weights)
        args.check(cfg)
        cls.preflight(cfg, args)  # MimCo: loads the teacher
        # The same through the config: check fills cfg.method.args with the defaults.
        method_cfg = Config()
        method_cfg.method.name = name
        if name == "mimco":
            method_cfg.method.args["teacher_checkpoint"] = str(weights)
        check(method_cfg, preflight=True)
        assert method_cfg.method.args == dataclasses.asdict(args)
        assert cls.parse_args(method_cfg) == args
        defaults[name] = args
    assert set(defaults) == {"micl", "mae", "macrl", "mimco"}
    assert defaults["micl"].mask_ratio == 0.9
    for name in ("mae", "macrl", "mimco"):
        assert defaults[name].mask_ratio == 0.75 != defaults["micl"].mask_ratio
    assert defaults["micl"].temperature == 0.07
    assert defaults["macrl"].temperature == 0.2 != defaults["micl"].temperature
    assert defaults["macrl"].strong_mask_ratio == 0.9
    assert defaults["mimco"].patch_negatives == "image"
    assert (defaults["mae"].decoder_dim, defaults["mae"].decoder_depth,
            defaults["mae"].decoder_heads, defaults["mae"].norm_pix_loss) == (512, 8, 16, True)
    assert defaults["micl"] == MiCLArgs(0.9, 0.07, 1 / 64, "local")


@pytest.mark.parametrize("strong", [0.75, 0.6])
def test_macrl_strong_mask_ratio_must_exceed_mask_ratio(strong):
    args = OBJECTIVES["macrl"].Args(mask_ratio=0.75, strong_mask_ratio=strong)
    with pytest.raises(ConfigError, match="method.strong_mask_ratio") as info:
        args.check(Config())
    assert "method.mask_ratio = 0.75" in str(info.value)
    with pytest.raises(ConfigError, match="method.strong_mask_ratio"):
        check(load_config(overrides=["method.name=macrl", f"method.strong_mask_ratio={strong}"]))


def test_a_method_field_typo_is_named():
    with pytest.raises(ConfigError, match=r"method\.mask_ration"):
        check(load_config(None, ["method.mask_ration=0.5"]))


# ----------------------------------------------------------------------------- weight decay


def test_param_groups_decay_the_tokens_but_not_biases_and_norms():
    cfg = check(load_config(overrides=["method.name=mae", "model.depth=1", "model.embed_dim=64",
                                       "model.num_heads=4", "method.decoder_dim=32",
                                       "method.decoder_depth=1", "method.decoder_heads=4"]))
    obj = build_objective(cfg)
    decay, no_decay = param_groups(obj, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    in_decay = {id(p) for p in decay["params"]}
    in_no_decay = {id(p) for p in no_decay["params"]}
    params = dict(obj.named_parameters())
    assert in_decay.isdisjoint(in_no_decay)
    assert in_decay | in_no_decay == {id(p) for p in params.values()}
    # The cls token ([1, 1, D]) and the decoder's mask token decay (timm 0.3's add_weight_decay).
    assert id(obj.encoder.cls_token) in in_decay
    assert id(obj.decoder.mask_token) in in_decay
    assert id(obj.encoder.patch_embed.proj.weight) in in_decay
    assert id(obj.encoder.blocks[0].attn.qkv.weight) in in_decay
    norms = [m for m in obj.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    for norm in norms:
        assert id(norm.weight) in in_no_decay and id(norm.bias) in in_no_decay
    biases = [p for n, p in params.items() if n.endswith(".bias")]
    assert biases and all(id(p) in in_no_decay for p in biases)
