"""Pre-training methods behind one interface; `method.name` in the config picks one."""

from micl.objectives import micl as _micl  # noqa: F401  (registers "micl")
from micl.objectives.base import OBJECTIVES, Objective, build_objective, register

__all__ = ["OBJECTIVES", "Objective", "build_objective", "register"]
