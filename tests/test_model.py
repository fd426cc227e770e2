import pytest
import torch
from timm.models.vision_transformer import Attention

from micl.config import ModelConfig
from micl.models import MaskedViT, gather_tokens


@pytest.mark.parametrize(
    ("name", "img", "patch", "chans", "dim"),
    [("vit_tiny", 28, 4, 1, 192), ("vit_tiny", 28, 4, 3, 192), ("vit_small", 32, 8, 3, 384),
     ("vit_base", 224, 16, 3, 768), ("vit_large", 224, 16, 3, 1024)],
)
def test_shapes_for_every_size(name, img, patch, chans, dim):
    m = ModelConfig(name=name, img_size=img, patch_size=patch, in_chans=chans,
                    depth=1 if name in ("vit_base", "vit_large") else None)
    enc = MaskedViT.from_config(m)
    x = torch.randn(2, chans, img, img)
    idx = torch.stack([torch.randperm(m.num_patches)[:5] for _ in range(2)])
    assert enc(x, idx).shape == (2, dim)
    assert enc(x).shape == (2, dim)
    assert enc.forward_features(x, idx).shape == (2, 6, dim)


def test_view_equals_timm_blocks_by_hand():
    torch.manual_seed(0)
    enc = MaskedViT(28, 4, 1, 64, 3, 4).eval()
    x = torch.randn(3, 1, 28, 28)
    idx = torch.stack([torch.randperm(49)[:7] for _ in range(3)])
    # By hand: conv patchify, add sin-cos, pick the listed patches, prepend cls, blocks, norm.
    tokens = enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + enc.pos_embed
    kept = torch.stack([tokens[b, idx[b]] for b in range(3)])
    h = torch.cat([enc.cls_token.expand(3, -1, -1), kept], dim=1)
    for block in enc.blocks:
        h = block(h)
    expected = enc.norm(h)[:, 0]
    torch.testing.assert_close(enc(x, idx), expected, rtol=1e-5, atol=1e-5)
    v1, v2 = enc.forward_views(x, [idx, idx.flip(1)])
    torch.testing.assert_close(v1, expected, rtol=1e-5, atol=1e-5)
    # The cls output does not depend on the order of the patches (no causal structure).
    torch.testing.assert_close(v2, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("chans", "img", "patch"), [(3, 224, 16), (3, 32, 8), (1, 28, 7)])
def test_projecting_only_the_kept_patches_equals_the_convolution_over_all(chans, img, patch):
    """The training path projects only the patches a view keeps (a Linear on the gathered
    pixels); its tokens and the projection's gradient are those of the Conv2d over the whole
    image, colour channels included."""
    torch.manual_seed(0)
    enc = MaskedViT(img, patch, chans, 48, 1, 4)
    x = torch.randn(2, chans, img, img)
    idx = torch.stack([torch.randperm(enc.num_patches)[:5] for _ in range(2)])
    by_conv = gather_tokens(enc.embed_patches(x), idx)
    (grad_conv,) = torch.autograd.grad(by_conv.square().sum(), enc.patch_embed.proj.weight)
    kept = enc.embed_visible(x, idx)
    (grad_kept,) = torch.autograd.grad(kept.square().sum(), enc.patch_embed.proj.weight)
    torch.testing.assert_close(kept, by_conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_kept, grad_conv, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_trainable_part_and_pos_embed_is_fixed():
    enc = MaskedViT(28, 4, 1, 64, 2, 4)
    assert "pos_embed" not in dict(enc.named_parameters())
    assert "pos_embed" in enc.state_dict()  # saved with the weights, never trained
    x = torch.randn(4, 1, 28, 28)
    idx = torch.stack([torch.randperm(49)[:6] for _ in range(4)])
    enc(x, idx).pow(2).sum().backward()
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.cls_token.grad.abs().sum() > 0
    for i, block in enumerate(enc.blocks):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), i


def test_attention_uses_fused_sdpa():
    enc = MaskedViT(28, 4, 1, 64, 1, 4)
    attn = [m for m in enc.modules() if isinstance(m, Attention)]
    assert attn and all(a.fused_attn for a in attn)


def test_sincos_position_embedding_is_distinct_per_patch():
    enc = MaskedViT(32, 8, 3, 64, 1, 4)
    pe = enc.pos_embed[0]
    assert pe.shape == (16, 64)
    assert torch.cdist(pe, pe).add(torch.eye(16) * 1e3).min() > 0.1


def test_gather_tokens():
    x = torch.arange(24.0).reshape(2, 4, 3)
    out = gather_tokens(x, torch.tensor([[3, 0], [1, 1]]))
    assert out.tolist() == [[x[0, 3].tolist(), x[0, 0].tolist()], [x[1, 1].tolist()] * 2]
