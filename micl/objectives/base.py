"""The small interface every pre-training method implements, and the registry.

A method is one file: a `@register("name")` subclass of `Objective` with its own `Args`
dataclass (its hyper-parameters, `method.<field>` in the config, with its paper's defaults and
its own `check`), the stream it needs (`stream_spec`: image views and mask samplers), and
`forward(batch) -> (loss, metrics)`. Plus one import line in `micl/objectives/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from micl.config import Config, ConfigError, merge_fields
from micl.data.stream import StreamSpec
from micl.models import MaskedViT

OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: `@register("micl")` makes `method.name: micl` select the class."""

    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return add


@dataclass
class MethodArgs:
    """A method's hyper-parameters (`method.<field>`). Subclasses add fields with their paper's
    defaults and override `check` (raise `method_error` naming the field)."""

    def check(self, cfg: Config) -> None:
        """Reject settings that break the method; `cfg` gives the model (e.g. patch count)."""


def method_error(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config error: method.{name} = {value!r}: {why}")


class Objective(nn.Module):
    """A method = an encoder (`self.encoder`, a MaskedViT, the thing that is kept and exported)
    plus whatever heads it trains, a loss, and the masks it needs from the data stream.

    - `stream_spec(cfg, args)` (driver side) names the image columns and the per-sample mask
      samplers that run in the Ray Data stream; the masks arrive as int64 index tensors;
    - `forward(batch)` takes the batch on the training device (`image*` columns normalised
      float [B, C, H, W] plus the index arrays) and returns (loss, metrics): every metric is
      averaged over the epoch and logged as it is named (e.g. `loss_rec`);
    - `after_step(step, total_steps)` runs after every optimizer step (a momentum teacher's
      EMA update goes here).
    """

    name: ClassVar[str] = "base"
    Args: ClassVar[type[MethodArgs]] = MethodArgs

    def __init__(self, cfg: Config, args: MethodArgs) -> None:
        super().__init__()
        self.cfg, self.args = cfg, args
        self.encoder = MaskedViT.from_config(cfg.model)

    @classmethod
    def parse_args(cls, cfg: Config) -> MethodArgs:
        """The typed, checked `Args` from `cfg.method.args` (a typo names `method.<field>`)."""
        args = cls.Args()
        try:
            merge_fields(args, dict(cfg.method.args), "method.")
        except ConfigError as e:  # e.g. MiCL's temperature given to MAE
            raise ConfigError(f"{e} (the fields of method.name = {cls.name})") from None
        args.check(cfg)
        return args

    @classmethod
    def preflight(cls, cfg: Config, args: MethodArgs) -> None:
        """Driver-side checks of what the method will load (e.g. a teacher run), before Ray."""

    @classmethod
    def stream_spec(cls, cfg: Config, args: MethodArgs) -> StreamSpec:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step on every worker (no-op by default)."""


def import_plugins(cfg: Config) -> None:
    """Import `run.import_modules`: a method (or source) defined outside micl registers itself
    on import. The driver calls this before checking the config, every worker before building
    the objective."""
    for name in cfg.run.import_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"config error: run.import_modules = {cfg.run.import_modules!r}: "
                              f"cannot import {name!r} ({e})") from None


def objective_class(cfg: Config) -> type[Objective]:
    if cfg.method.name not in OBJECTIVES:
        raise ConfigError(f"config error: method.name = {cfg.method.name!r}: unknown method; "
                          f"choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.method.name]


def check(cfg: Config, preflight: bool = False) -> Config:
    """Check the method fields through the registry and record the method's full settings
    (its defaults included) in `cfg.method.args`, so MLflow params show what trained. With
    `preflight`, also check what the method loads (the driver does, once per run)."""
    cls = objective_class(cfg)
    args = cls.parse_args(cfg)
    cfg.method.args = dataclasses.asdict(args)
    if preflight:
        cls.preflight(cfg, args)
    return cfg


def build_objective(cfg: Config) -> Objective:
    cls = objective_class(cfg)
    return cls(cfg, cls.parse_args(cfg))


def stream_spec(cfg: Config) -> StreamSpec:
    cls = objective_class(cfg)
    return cls.stream_spec(cfg, cls.parse_args(cfg))
