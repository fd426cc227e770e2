"""The learning-rate schedule every trainer here shares (pre-training, fine-tuning, the
benchmarks' plain loops): a pure function, importable without Ray or MLflow."""

from __future__ import annotations

import math


def lr_at(epoch: float, peak_lr: float, warmup_epochs: float, epochs: int,
          min_lr: float = 0.0) -> float:
    """Per-step linear warmup, then half-cycle cosine to min_lr (epoch is fractional)."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
