import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from micl.config import ModelConfig, load_config
from micl.models import MaskedViT
from micl.models.pretrained import export_encoder
from micl.objectives import OBJECTIVES, build_objective
from micl.objectives.micl import micl_loss, tvmf_similarity

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
    mp.spawn(_global_worker, args=(2, _free_port(), a, b, w, out), nprocs=2, join=True)
    assert abs(out[0].item() - ref.item()) < 1e-5
    torch.testing.assert_close(out[1:].reshape(4, 6), lin.weight.grad, rtol=1e-5, atol=1e-6)


def _teacher_overrides(name, tmp_path):
    """MimCo needs a frozen teacher: a small exported encoder (narrower than the student)."""
    if name != "mimco":
        return []
    m = ModelConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    return [f"method.teacher_checkpoint={export_encoder(MaskedViT.from_config(m), m, tmp_path)}"]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_trains_a_step(name, tmp_path):
    cfg = load_config(overrides=[f"method.name={name}", "model.depth=2", "model.embed_dim=64",
                                 "model.num_heads=4", "method.mask_ratio=0.5",
                                 "method.decoder_dim=64", "method.decoder_depth=1",
                                 "method.decoder_heads=4", "method.proj_hidden_dim=128",
                                 *_teacher_overrides(name, tmp_path)])
    obj = build_objective(cfg)
    rng = np.random.default_rng(0)
    masks = {k: torch.from_numpy(v) for k, v in obj.draw_masks(cfg, 8, rng).items()}
    images = {col: torch.randn(8, 1, 28, 28) for col in obj.image_views(cfg)}  # macrl: 2 views
    batch = {**images, **masks}
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
