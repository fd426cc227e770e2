"""Frozen-feature evaluation: cls features of the whole image and a weighted kNN classifier."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from micl.data.transforms import normalize
from micl.models import MaskedViT


@torch.no_grad()
def extract_features(encoder: MaskedViT, batches: Iterable[dict[str, torch.Tensor]],
                     mean: list[float], std: list[float], device: torch.device | str = "cpu",
                     autocast_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised cls features of the unmasked images ([N, D]) and their labels ([N])."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in batches:
        images = normalize(batch["image"].to(device, non_blocking=True), mean, std)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            z = encoder(images)
        feats.append(F.normalize(z.float(), dim=-1).cpu())
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
    its class with weight exp(sim / T). Features must be L2-normalised. Returns top-1 accuracy."""
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
