from micl.models.vit import MaskedViT, gather_tokens

__all__ = ["MaskedViT", "gather_tokens"]
