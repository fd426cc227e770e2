"""Pre-training methods behind one interface; `method.name` in the config picks one.

Adding a method: one file defining a `@register("name")` Objective with its own `Args`, and one
import line below.
"""

from micl.objectives import macrl as _macrl  # noqa: F401  (registers "macrl")
from micl.objectives import mae as _mae  # noqa: F401  (registers "mae")
from micl.objectives import micl as _micl  # noqa: F401  (registers "micl")
from micl.objectives import mimco as _mimco  # noqa: F401  (registers "mimco")
from micl.objectives.base import (
    OBJECTIVES,
    MethodArgs,
    Objective,
    build_objective,
    check,
    import_plugins,
    method_error,
    objective_class,
    register,
    stream_spec,
)

__all__ = ["OBJECTIVES", "MethodArgs", "Objective", "build_objective", "check", "import_plugins",
           "method_error", "objective_class", "register", "stream_spec"]
