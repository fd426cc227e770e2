"""The MAE-style light decoder (MAE, MACRL) / predictor (MimCo), and pixel targets.

The decoder takes the encoder's output tokens of the visible patches, adds mask tokens at the
positions to predict, and runs a few timm Blocks with its own fixed sin-cos position embedding.
MAE lays out all L positions in image order; attention does not care about order once every
token carries its position, so here the sequence is [cls | visible | queries] and only the
queries are predicted. With MAE masks (queries = every hidden patch) this is the same network.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from micl.models.pos_embed import sincos_2d
from micl.models.vit import gather_tokens, init_mae_weights


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, patch * patch * C], patches in row-major order (MAE's layout:
    the pixels of a patch as (row, column, channel))."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def patch_targets(images: torch.Tensor, idx: torch.Tensor, patch: int, norm_pix: bool
                  ) -> torch.Tensor:
    """The pixels of the patches in idx ([B, m]) as [B, m, patch * patch * C] float32; with
    norm_pix each patch is normalised by its own mean and variance (MAE's norm_pix_loss)."""
    target = gather_tokens(patchify(images.float(), patch), idx)  # [B, m, P]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor, idx: torch.Tensor,
                        patch: int, norm_pix: bool, kind: str = "mse") -> torch.Tensor:
    """Mean per-pixel error ("mse" or "l1") between pred [B, m, P] and the pixels of the
    patches idx [B, m] of images [B, C, H, W]: only those patches count."""
    err = pred.float() - patch_targets(images, idx, patch, norm_pix)
    return err.pow(2).mean() if kind == "mse" else err.abs().mean()


class MaskedDecoder(nn.Module):
    """Linear(in_dim -> dim), mask tokens at the query positions, `depth` timm Blocks,
    LayerNorm, Linear(dim -> out_dim). `forward(tokens, visible, query) -> [B, m, out_dim]`."""

    def __init__(self, grid_size: int, in_dim: int, dim: int, depth: int, num_heads: int,
                 out_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(grid_size, dim).unsqueeze(0))  # [1, L, dim]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(depth))
        self.norm = norm(dim)
        self.head = nn.Linear(dim, out_dim)
        # MAE: xavier Linears, zero biases, mask token ~ N(0, .02).
        nn.init.normal_(self.mask_token, std=0.02)
        init_mae_weights(self)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, query: torch.Tensor
                ) -> torch.Tensor:
        """tokens: encoder output [B, 1 + n, D_in] (cls first) of the patches visible [B, n];
        query: [B, m] positions to predict. Returns [B, m, out_dim]."""
        b, m = query.shape
        pos = self.pos_embed.expand(b, -1, -1)  # [B, L, dim]
        x = self.embed(tokens)  # [B, 1 + n, dim]
        cls = x[:, :1]  # no position for cls (MAE)
        seen = x[:, 1:] + gather_tokens(pos, visible)  # [B, n, dim]
        asked = self.mask_token + gather_tokens(pos, query)  # [B, m, dim]
        x = torch.cat([cls, seen, asked], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -m:]))  # [B, m, out_dim]
