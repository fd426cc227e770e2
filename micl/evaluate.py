"""Frozen-feature evaluation protocols: cls features of the whole image, a weighted kNN
classifier, a linear probe. Pure functions of tensors; `micl.driver.evaluate_run` applies them to
a finished run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from micl.data.transforms import normalize
from micl.models import MaskedViT


@torch.no_grad()
def extract_features(encoder: MaskedViT, batches: Iterable[dict[str, torch.Tensor]],
                     mean: list[float], std: list[float], device: torch.device | str = "cpu",
                     autocast_dtype: torch.dtype | None = None, l2: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """cls features of the unmasked images ([N, D], L2-normalised unless l2=False) and their
    labels ([N])."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in batches:
        images = normalize(batch["image"].to(device, non_blocking=True), mean, std)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            z = encoder(images)
        feats.append((F.normalize(z.float(), dim=-1) if l2 else z.float()).cpu())
        labels.append(batch["label"].cpu())
    encoder.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from (empty dataset)")
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_top1(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
             query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    """Weighted kNN (InstDisc / DINO): each of the k most cosine-similar bank samples votes for
    its class with weight exp(sim / T). Features must be L2-normalised. Returns top-1 accuracy.
    The similarities and votes are float32 whatever the features' dtype: in bf16 (8 bits of
    mantissa) near-equal similarities tie and exp(sim / T) rounds the votes."""
    bank_feats, query_feats = bank_feats.float(), query_feats.float()
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, bank_feats.shape[0])
    correct = 0
    for start in range(0, query_feats.shape[0], chunk):
        q = query_feats[start : start + chunk]  # [Q, D]
        sim, idx = (q @ bank_feats.T).topk(k, dim=1)  # [Q, k]
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + chunk]).sum().item()
    return correct / query_feats.shape[0]


def pixel_knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor,
                   query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """The raw-pixel baseline: the same kNN on normalised, flattened pixels."""
    def flat(x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    return knn_top1(flat(bank), bank_labels, flat(query), query_labels, k, temperature)


PROBE_OPTIMIZERS = ("sgd", "lars")


def probe_optimizer(head: nn.Module, name: str, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), or MAE's LARS: timm's `Lars` with the trust ratio on the weight
    matrices only, also at weight decay 0 (`always_adapt`: timm skips the ratio there by
    default, and MAE's probe runs at weight decay 0); biases get plain momentum SGD."""
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name != "lars":
        raise ValueError(f"probe optimizer {name!r}: choose one of {list(PROBE_OPTIMIZERS)}")
    from timm.optim import Lars

    matrices = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "always_adapt": True},
                 {"params": others, "always_adapt": False, "weight_decay": 0.0}],
                lr=lr, momentum=0.9, weight_decay=weight_decay, trust_coeff=0.001)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, test_labels: torch.Tensor, epochs: int = 90,
                 batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0,
                 seed: int = 0, optimizer: str = "sgd", warmup_epochs: int = 0) -> float:
    """MAE's linear probe on frozen features: BatchNorm1d(affine=False, eps=1e-6) + Linear
    (weights ~ N(0, 0.01)), cross-entropy, lr = blr * batch / 256, per-step linear warmup then
    half-cycle cosine to 0, no weight decay. `optimizer`: "sgd" (momentum 0.9, what small sets
    need) or "lars" (MAE's choice at batch 16384: blr 0.1, 10 warmup epochs). The features are
    extracted once (centre crops, no augmentation: MAE augments, which a fixed feature set
    cannot), so this runs in seconds in-process. Features: raw cls outputs [N, D]. Returns
    test top-1 accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's initialisation
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_feats.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_feats.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = blr * batch_size / 256
    opt = probe_optimizer(head, optimizer, lr, weight_decay)
    n = train_feats.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total, warmup, step = epochs * per_epoch, warmup_epochs * per_epoch, 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            step += 1
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            scale = step / warmup if step <= warmup else \
                0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / max(total - warmup, 1)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(head(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(test_feats).argmax(dim=1)
    return (pred == test_labels).float().mean().item()
