"""Pre-training methods behind one interface; `method.name` in the config picks one."""

from micl.objectives import macrl as _macrl  # noqa: F401  (registers "macrl")
from micl.objectives import mae as _mae  # noqa: F401  (registers "mae")
from micl.objectives import micl as _micl  # noqa: F401  (registers "micl")
from micl.objectives import mimco as _mimco  # noqa: F401  (registers "mimco")
from micl.objectives.base import OBJECTIVES, Objective, build_objective, register

__all__ = ["OBJECTIVES", "Objective", "build_objective", "register"]
