"""Fixed 2-D sin-cos position embedding (MAE / MoCo v3): not learned."""

from __future__ import annotations

import torch


def sincos_2d(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[grid_size**2, dim]; half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [G*G] -> [G*G, dim/2]
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(gy), encode(gx)], dim=1).float()  # [L, dim]
