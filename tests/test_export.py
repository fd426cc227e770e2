import torch

from micl.config import ModelConfig
from micl.models import MaskedViT
from micl.models.export import load_timm_encoder, timm_state_dict


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
