"""Config checks shared by the methods' `validate`; errors name the field, as in config.py."""

from __future__ import annotations

from typing import Any

from micl.config import Config, ConfigError


def method_error(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config error: method.{name} = {value!r}: {why}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def ratio(cfg: Config, name: str) -> None:
    """method.<name> in (0, 1), leaving at least one visible and one masked patch (MAE masks:
    max(1, int(L * (1 - r))) visible)."""
    value = getattr(cfg.method, name)
    if not _number(value) or not 0 < value < 1:
        raise method_error(name, value, "must be in (0, 1)")
    if max(1, int(cfg.model.num_patches * (1 - value))) >= cfg.model.num_patches:
        raise method_error(name, value, f"masks none of the {cfg.model.num_patches} patches")


def positive(cfg: Config, name: str, integer: bool = False) -> None:
    value = getattr(cfg.method, name)
    if not _number(value) or (integer and not isinstance(value, int)) or not value > 0:
        raise method_error(name, value, "must be an integer > 0" if integer else "must be > 0")


def weights(cfg: Config, *names: str) -> None:
    """Loss weights: each >= 0, not all 0."""
    for name in names:
        value = getattr(cfg.method, name)
        if not _number(value) or value < 0:
            raise method_error(name, value, "must be >= 0")
    if all(getattr(cfg.method, n) == 0 for n in names):
        raise method_error(names[0], 0, f"{' and '.join(f'method.{n}' for n in names)} are all 0")


def decoder(cfg: Config) -> None:
    """decoder_dim / depth / heads: positive integers; dim divisible by heads and by 4 (its
    2-D sin-cos position embedding)."""
    for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
        positive(cfg, name, integer=True)
    me = cfg.method
    if me.decoder_dim % me.decoder_heads:
        raise method_error("decoder_dim", me.decoder_dim,
                           f"not divisible by method.decoder_heads = {me.decoder_heads}")
    if me.decoder_dim % 4:
        raise method_error("decoder_dim", me.decoder_dim,
                           "must be divisible by 4 (2-D sin-cos position embedding)")
