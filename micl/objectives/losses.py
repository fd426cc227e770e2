"""Contrastive losses shared by the methods.

Every loss here runs in float32 with autocast off, whatever the caller's autocast: under bf16 the
similarity matrix and its log-softmax lose about 3% of the loss at batch 128 (measured on CPU
autocast; tests/test_objective_micl.py), and these matrices are a negligible part of a step's
FLOPs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _float32(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.float() for x in xs]


def tvmf_similarity(cos: torch.Tensor, kappa: float, temperature: float) -> torch.Tensor:
    """t-vMF logits: 0.5 * (1 + c) / (1 + kappa * (1 - c)) / tau. kappa -> 0 gives
    (1 + c) / (2 tau), i.e. cosine logits at temperature 2 tau plus a constant."""
    return 0.5 * (1 + cos) / (1 + kappa * (1 - cos)) / temperature


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own slice, so
    the loss computed against gathered embeddings trains the owners of those embeddings too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [B, D] -> [W*B, D]
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss contributes to every slice
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, D] -> ([W*B, D], offset of this rank's rows); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def micl_loss(z1: torch.Tensor, z2: torch.Tensor, kappa: float, temperature: float,
              negatives: str = "local") -> torch.Tensor:
    """Symmetric cross-entropy over t-vMF similarities of the two views' embeddings.

    z1, z2: [B, D] (any scale; L2-normalised here). `negatives="local"` contrasts within this
    process's batch (the reference code); "global" against the whole global batch. In the global
    case the mean of the per-rank losses equals the single-process loss on the global batch, and
    with DDP's gradient averaging so do the gradients (checked in tests/test_objective_micl.py).
    """
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = (F.normalize(z, dim=-1) for z in _float32(z1, z2))
        if negatives == "global":
            z1_all, offset = gather_with_grad(z1)
            z2_all, _ = gather_with_grad(z2)
        else:
            z1_all, z2_all, offset = z1, z2, 0
        labels = torch.arange(z1.shape[0], device=z1.device) + offset
        s12 = tvmf_similarity(z1 @ z2_all.T, kappa, temperature)  # [B, W*B]: view 1 vs all 2
        s21 = tvmf_similarity(z2 @ z1_all.T, kappa, temperature)  # [B, W*B]: view 2 vs all 1
        return 0.5 * (F.cross_entropy(s12, labels) + F.cross_entropy(s21, labels))


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, negatives: str = "local",
             symmetric: bool = True) -> torch.Tensor:
    """InfoNCE over cosine similarities: row i of q [B, D] is the positive of row i of k
    [B, D], the other rows are negatives (of this worker's batch, or of the global batch with
    negatives="global"). symmetric averages the q->k and k->q directions."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = (F.normalize(x, dim=-1) for x in _float32(q, k))
        if negatives == "global":
            k_all, offset = gather_with_grad(k)
            q_all = gather_with_grad(q)[0] if symmetric else q
        else:
            k_all, q_all, offset = k, q, 0
        labels = torch.arange(q.shape[0], device=q.device) + offset
        loss = F.cross_entropy(q @ k_all.T / temperature, labels)  # [B, W*B] logits
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(k @ q_all.T / temperature, labels))
        return loss


def patch_info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float,
                   negatives: str = "batch") -> torch.Tensor:
    """pred, target: [B, m, D]; pred[b, i] is the positive of target[b, i]. Negatives: every
    other target token of the batch ("batch", (B m)^2 logits) or of the same image ("image",
    B m^2)."""
    with torch.autocast(pred.device.type, enabled=False):
        p, t = (F.normalize(x, dim=-1) for x in _float32(pred, target))
        b, m, _ = p.shape
        if negatives == "image":
            logits = p @ t.transpose(1, 2) / temperature  # [B, m, m]
            labels = torch.arange(m, device=p.device).repeat(b)
            return F.cross_entropy(logits.reshape(b * m, m), labels)
        p, t = p.reshape(b * m, -1), t.reshape(b * m, -1)
        labels = torch.arange(b * m, device=p.device)
        return F.cross_entropy(p @ t.T / temperature, labels)  # [B*m, B*m]
