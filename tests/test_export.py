import torch

from micl.config import ModelConfig
from micl.models import MaskedViT
from micl.models.export import (
    TIMM_NAMES,
    encoder_from_timm,
    load_timm_encoder,
    model_from_timm_json,
    timm_kwargs,
    timm_state_dict,
)


def test_timm_model_gives_the_same_cls_features():
    m = ModelConfig(name="vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2,
                    embed_dim=64, num_heads=4)
    ours = MaskedViT.from_config(m).eval()
    with torch.no_grad():  # make the weights non-trivial
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    theirs = load_timm_encoder(m, timm_state_dict(ours)).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_timm_state_dict_loads_back_into_our_encoder():
    m = ModelConfig(name="vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=1,
                    embed_dim=32, num_heads=2)
    ours = MaskedViT.from_config(m).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = timm_state_dict(ours)
    assert state["pos_embed"].shape == (1, 1 + 16, 32)  # timm's: a (zero) cls row first
    assert state["pos_embed"][0, 0].abs().sum() == 0
    back = encoder_from_timm(state, m)
    assert not back.training
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x))
    meta = {"model_name": TIMM_NAMES[m.name], "num_classes": 0, **timm_kwargs(m)}
    assert model_from_timm_json(meta) == m
