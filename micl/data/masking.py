"""Patch masks for masked image modelling, drawn in the Ray Data stream (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np


def patches_per_view(num_patches: int, mask_ratio: float) -> int:
    """MiCL keeps n = int(L * (1 - r)) // 2 * 2 patches and splits them into two views of n/2."""
    return int(num_patches * (1 - mask_ratio)) // 2


def sample_view_indices(
    batch_size: int, num_patches: int, mask_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random views of n/2 patch indices each, per sample.

    Returns view1, view2: int64 [B, n/2]. Which patches are kept, and which view each goes to,
    is uniform: a random permutation of the L patches, cut into [view1 | view2 | never seen].
    """
    k = patches_per_view(num_patches, mask_ratio)
    if k < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no patch per view of {num_patches}")
    noise = rng.random((batch_size, num_patches))  # [B, L]
    order = np.argsort(noise, axis=1)  # [B, L]: a uniform random permutation per row
    return order[:, :k].astype(np.int64), order[:, k : 2 * k].astype(np.int64)


def sample_mae_mask(
    batch_size: int, num_patches: int, mask_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MAE: keep int(L * (1 - r)) random patches. Returns visible [B, n] and masked [B, L - n]."""
    n = max(1, int(num_patches * (1 - mask_ratio)))
    order = np.argsort(rng.random((batch_size, num_patches)), axis=1)  # [B, L]
    return order[:, :n].astype(np.int64), order[:, n:].astype(np.int64)


def sample_rng(run_seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator for one sample in one epoch: every random choice for that sample
    (crop, flip, masks) comes from it, so a run is reproducible whatever the batching."""
    return np.random.default_rng([run_seed & 0xFFFFFFFF, epoch, int(sample_id) & (2**63 - 1)])
