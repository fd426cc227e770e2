"""Patch masks for masked image modelling, drawn in the Ray Data stream (numpy in, numpy out)."""

from __future__ import annotations

from dataclasses import dataclass

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


# Per-sample mask samplers. An objective names the ones it needs (its `stream_spec`); the stream
# calls each with the sample's generator, in order, after the views' crops. They are plain
# dataclasses so that Ray can ship them to the map tasks.


@dataclass(frozen=True)
class ViewPairMasks:
    """MiCL: two disjoint views of k = patches_per_view(L, r) patch indices -> {view1: [k],
    view2: [k]} (the column names are `names`)."""

    num_patches: int
    mask_ratio: float
    names: tuple[str, str] = ("view1", "view2")

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        v1, v2 = sample_view_indices(1, self.num_patches, self.mask_ratio, rng)
        return {self.names[0]: v1[0], self.names[1]: v2[0]}


@dataclass(frozen=True)
class VisibleMaskedMasks:
    """MAE: {prefix + "visible": [n], prefix + "masked": [L - n]} (n = max(1, int(L (1 - r))))."""

    num_patches: int
    mask_ratio: float
    prefix: str = ""

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        visible, masked = sample_mae_mask(1, self.num_patches, self.mask_ratio, rng)
        return {f"{self.prefix}visible": visible[0], f"{self.prefix}masked": masked[0]}
