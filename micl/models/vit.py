"""A ViT encoder that runs only the patches it is given (timm's PatchEmbed and Block).

MiCL at r = 0.9 on 224/16 feeds the blocks 9 patch tokens + 1 cls token per view instead of
197, which is where its speed comes from; this module makes that the normal path, from the
patch projection on: only the kept patches are projected (a GPU profile of a ViT-L/16 step at
r = 0.9 found 10% of its time in a convolution over all 196 patches, BENCHMARKS.md).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from micl.config import ModelConfig
from micl.models.pos_embed import sincos_2d


def init_mae_weights(root: nn.Module) -> None:
    """MAE's initialisation of every Linear (xavier, zero bias) and LayerNorm (1, 0) in root."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, L, D], idx: [B, k] -> [B, k, D] (the tokens of the kept patches)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_patches(images: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    """images: [B, C, H, W], idx: [B, k] (patch numbers, row by row over the grid) ->
    the kept patches' pixels [B, k, C*p*p], each in the order of the patch projection's Conv2d
    weight [D, C, p, p]. Reads only the kept patches: no copy of the whole image is made."""
    B, C, H, W = images.shape
    grid = images.view(B, C, H // p, p, W // p, p)  # [B, C, gh, p, gw, p], no copy
    rows, cols = idx // (W // p), idx % (W // p)  # [B, k]
    batch = torch.arange(B, device=images.device)[:, None]  # [B, 1]
    # Advanced indices on dims 0, 2, 4, split by slices: their [B, k] comes first.
    return grid[batch, :, rows, :, cols, :].reshape(B, idx.shape[1], C * p * p)


class MaskedViT(nn.Module):
    """ViT with a learnable cls token and a fixed sin-cos position embedding.

    `forward(images, idx)` encodes, per sample, only the patches listed in `idx` and returns
    the cls output after the final LayerNorm ([B, D]); `idx=None` encodes the whole image.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = img_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(grid, embed_dim).unsqueeze(0))  # [1, L, D]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self._init_weights()

    @classmethod
    def from_config(cls, m: ModelConfig) -> MaskedViT:
        dim, depth, heads = m.dims()
        return cls(m.img_size, m.patch_size, m.in_chans, dim, depth, heads, m.mlp_ratio)

    def _init_weights(self) -> None:
        # MAE: patch projection initialised like a Linear layer, cls ~ N(0, .02), xavier Linears.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        init_mae_weights(self)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] -> patch tokens with position: [B, L, D]."""
        return self.patch_embed(images) + self.pos_embed

    def embed_visible(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W], idx: [B, k] -> the kept patches' tokens with position:
        [B, k, D], equal to gather_tokens(embed_patches(images), idx) at k / L of the
        projection's cost (the Conv2d's weight used as a Linear on the gathered patches)."""
        proj = self.patch_embed.proj
        pixels = gather_patches(images, idx, self.patch_size)  # [B, k, C*p*p]
        tokens = F.linear(pixels, proj.weight.flatten(1), proj.bias)
        return tokens + self.pos_embed[0, idx]  # pos_embed[0, idx]: [B, k, D]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, k, D] (already position-embedded) -> normed [B, 1 + k, D], cls first."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor, idx: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """All output tokens [B, 1 + k, D] for the patches in idx ([B, k]; None = all)."""
        if idx is None:
            return self.forward_tokens(self.embed_patches(images))
        return self.forward_tokens(self.embed_visible(images, idx))

    def forward(self, images: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(images, idx)[:, 0]

    def forward_views(self, images: torch.Tensor, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """cls outputs [B, D] of several views of the same images, in one pass through the blocks
        when the views have equal size."""
        gathered = [self.embed_visible(images, v) for v in views]
        if len({g.shape[1] for g in gathered}) == 1:
            out = self.forward_tokens(torch.cat(gathered, dim=0))[:, 0]  # [V*B, D]
            return list(out.chunk(len(views), dim=0))
        return [self.forward_tokens(g)[:, 0] for g in gathered]

    def no_weight_decay_names(self) -> set[str]:
        return {"cls_token"}
