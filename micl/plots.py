"""Pictures logged with runs (matplotlib's object API: renders with Agg, needs no display).

matplotlib is imported when a picture is drawn, not with the module: every training worker
imports this module, and only rank 0 draws, once per run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _visible_only(image: np.ndarray, idx: np.ndarray, patch: int) -> np.ndarray:
    """image: [H, W, C] -> the same image with every patch not in idx greyed out."""
    h, w = image.shape[:2]
    grid_w = w // patch
    keep = np.zeros((h // patch, grid_w), dtype=bool)
    keep.flat[idx] = True
    mask = np.kron(keep, np.ones((patch, patch), dtype=bool))[..., None]
    return np.where(mask, image, 128).astype(np.uint8)


def masked_views_figure(images: torch.Tensor, masks: dict[str, torch.Tensor], patch: int,
                        path: str | Path) -> Path:
    """One row per image: the crop the model got, then what each mask leaves visible.

    images: uint8 [N, C, H, W]; masks: name -> [N, k] patch indices.
    """
    from matplotlib.figure import Figure

    imgs = images.cpu().numpy().transpose(0, 2, 3, 1)  # [N, H, W, C]
    names = list(masks)
    n = imgs.shape[0]
    fig = Figure(figsize=(1.8 * (1 + len(names)), 1.8 * n))
    axes = fig.subplots(n, 1 + len(names), squeeze=False)
    for r in range(n):
        panels = [("image", imgs[r])] + [
            (name, _visible_only(imgs[r], masks[name][r].cpu().numpy(), patch)) for name in names]
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray",
                      vmin=0, vmax=255)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
