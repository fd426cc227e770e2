"""Ray Tune search spaces read from YAML (`tune_spaces/*.yaml`), validated before Ray starts.

The file format: a mapping with a `params:` section (dotted config field -> spec) and a few
optional search settings.

```yaml
params:
  method.mask_ratio: {grid: [0.5, 0.75, 0.9]}     # every value, crossed with the other grids
  method.temperature: {choice: [0.05, 0.07, 0.1]}  # one value drawn at random per trial
  optim.blr: {loguniform: [1.0e-5, 1.0e-3]}        # low, high; both > 0
  method.kappa: {uniform: [0.0, 0.25]}             # low, high
  optim.warmup_epochs: {randint: [0, 5]}           # integers, low inclusive, high exclusive
num_samples: 1              # trials per grid point (random search: number of draws)
metric: knn_top1            # what trials are compared by each epoch; never the contrastive loss
mode: max                   # max or min
rank_by: linear_top1        # optional: rank the trials that finish by a linear probe run at
                            # their end (the papers' protocol); `metric` still drives ASHA
scheduler: asha             # asha (stops poor trials early) or fifo (runs every trial to the end)
search: random              # random (covers grid) or optuna (needs the optuna package; no grids)
max_concurrent_trials: 2    # optional; the tune pipeline sets it from the cluster's resources
```

Write small and large numbers with a dot (`1.0e-5`): YAML 1.1 reads `1e-5` as text. Such
strings are accepted and turned into numbers here, so either spelling works.

Every mistake is a `ConfigError` whose message names the file and the field: an unknown config
field, an unknown spec kind, an empty list, low >= high, a value that would make the config
invalid (each grid/choice value and both ends of a range are applied to the base config and
validated), an unknown scheduler or search algorithm, or ranking by a loss.

    space = load_space("tune_spaces/mask_ratio_temperature.yaml", base=cfg)
    tuner = tune.Tuner(trainable, param_space=space.to_tune(), ...)
    # inside a trial:
    trial_cfg = apply_trial_params(cfg, trial_params)
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from micl.config import Config, ConfigError, from_dict, nest
from micl.driver import check

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
LIST_KINDS = ("grid", "choice")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
MODES = ("max", "min")
SETTINGS = ("num_samples", "metric", "mode", "scheduler", "search", "max_concurrent_trials",
            "rank_by")
RANK_BY = ("linear_top1",)  # end-of-trial protocols (micl.driver.evaluate_run)


@dataclass
class SearchSpace:
    """A validated search space: `params` maps a dotted config field to `{kind: values}`."""

    params: dict[str, dict[str, Any]]
    num_samples: int = 1
    metric: str = "knn_top1"
    mode: str = "max"
    scheduler: str = "asha"
    search: str = "random"
    max_concurrent_trials: int | None = None
    rank_by: str | None = None  # None: rank by `metric`; "linear_top1": a probe at each end
    path: str | None = field(default=None, compare=False)

    @property
    def ranking_metric(self) -> str:
        return self.rank_by or self.metric

    def to_tune(self) -> dict[str, Any]:
        """The `param_space` for `ray.tune.Tuner`, keyed by dotted config field."""
        from ray import tune  # imported here so that validating a space does not load Ray

        makers = {
            "grid": tune.grid_search,
            "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
        }
        return {name: makers[kind](values) for name, (kind, values) in self._items()}

    def num_trials(self) -> int:
        """How many trials Tune will run: the product of the grid sizes times num_samples."""
        grid = math.prod(len(v) for _, (kind, v) in self._items() if kind == "grid")
        return grid * self.num_samples

    def grid_params(self) -> list[str]:
        """Names of the fields searched by grid."""
        return [name for name, (kind, _) in self._items() if kind == "grid"]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-safe) for logging with the parent run."""
        return {
            "params": copy.deepcopy(self.params),
            "num_samples": self.num_samples,
            "num_trials": self.num_trials(),
            "metric": self.metric,
            "mode": self.mode,
            "scheduler": self.scheduler,
            "search": self.search,
            "max_concurrent_trials": self.max_concurrent_trials,
            "rank_by": self.rank_by,
        }

    def summary(self) -> str:
        """One line for logs: what is searched and how trials are ranked."""
        parts = [f"{name} {kind} {values}" for name, (kind, values) in self._items()]
        return (f"{self.num_trials()} trials over " + "; ".join(parts)
                + f"; ranked by {self.ranking_metric} ({self.mode}), scheduler "
                f"{self.scheduler} on {self.metric}, search {self.search}")

    def _items(self) -> list[tuple[str, tuple[str, Any]]]:
        return [(name, next(iter(spec.items()))) for name, spec in self.params.items()]


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file.

    `base` is the config the trials start from (default: `Config()`); every searched value is
    checked against it, so e.g. a mask ratio that leaves no patch for a 28 px image is caught
    here, not in the middle of a search.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error: search space file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: search space {p} is not valid YAML: {e}") from None
    return parse_space(raw, base=base, source=str(p))


def parse_space(raw: Any, base: Config | None = None, source: str = "<search space>"
                ) -> SearchSpace:
    """Validate an already-loaded search-space mapping (see the module docstring)."""
    # Checked through the registries: the method's own fields become known (and searchable).
    base = check(from_dict((base if base is not None else Config()).to_dict()))
    if not isinstance(raw, dict):
        raise _space_err(source, "<file>", f"expected a mapping with a 'params:' section, "
                                           f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SETTINGS) - {"params"})
    if unknown:
        raise _space_err(source, unknown[0], f"unknown key; known: ['params', *{list(SETTINGS)}]"
                         + _did_you_mean(unknown[0], ["params", *SETTINGS]))
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise _space_err(source, "params", "need a non-empty mapping of dotted config field -> "
                                           "spec, e.g. method.mask_ratio: {grid: [0.75, 0.9]}")
    space = SearchSpace(
        params={name: _check_param(source, base, name, spec) for name, spec in params.items()},
        num_samples=_check_count(source, "num_samples", raw.get("num_samples", 1)),
        metric=_check_metric(source, raw.get("metric", "knn_top1")),
        mode=_check_choice(source, "mode", raw.get("mode", "max"), MODES),
        scheduler=_check_choice(source, "scheduler", raw.get("scheduler", "asha"), SCHEDULERS),
        search=_check_choice(source, "search", raw.get("search", "random"), SEARCHES),
        max_concurrent_trials=_check_count(source, "max_concurrent_trials",
                                           raw.get("max_concurrent_trials"), allow_none=True),
        rank_by=_check_rank_by(source, raw.get("rank_by")),
        path=source,
    )
    _check_search_algorithm(source, space)
    _check_trial_workers(source, base, space)
    return space


def _check_trial_workers(source: str, base: Config, space: SearchSpace) -> None:
    """Ray Train's local mode (run.num_workers = 0) cannot run inside a Tune trial (Ray
    closes Ray Train's API there); one worker is the lightest trial: it trains in the trial's
    own process (micl.tune)."""
    spec = space.params.get("run.num_workers")
    values = next(iter(spec.values())) if spec else [base.run.num_workers]
    if min(values) < 1:
        raise _space_err(source, "run.num_workers", "trials need at least 1 worker (with 1, a "
                                                    "trial trains in its own process)")


def apply_trial_params(base: Config, params: dict[str, Any]) -> Config:
    """A validated copy of `base` with the dotted `params` of one trial applied."""
    known = check(from_dict(base.to_dict())).flat()  # the method's own fields included
    for name in params:
        if name not in known:
            raise ConfigError(f"config error: {name}: unknown config field"
                              + _did_you_mean(name, list(known)))
    flat = {**known, **{name: _plain(value) for name, value in params.items()}}
    return check(from_dict(nest(flat)))


# --- validation helpers -----------------------------------------------------------------------


def _space_err(source: str, name: str, why: str) -> ConfigError:
    return ConfigError(f"config error: search space {source}: {name}: {why}")


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
    """numpy scalars (as some Tune samplers return) -> Python numbers the config accepts."""
    return value.item() if hasattr(value, "item") and not isinstance(value, list) else value


def _check_param(source: str, base: Config, name: Any, spec: Any) -> dict[str, Any]:
    """Validate one `field: {kind: values}` entry; return it with values normalised."""
    known = base.flat()
    if not isinstance(name, str) or name not in known:
        hint = " (use dotted names such as method.mask_ratio)" if name in base.to_dict() else ""
        raise _space_err(source, f"params.{name}", "unknown config field"
                         + (hint or _did_you_mean(str(name), list(known))))
    where = f"params.{name}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _space_err(source, where, f"expected one spec such as {{grid: [...]}}, got "
                                        f"{spec!r}; kinds: {list(SPEC_KINDS)}")
    kind, values = next(iter(spec.items()))
    if kind not in SPEC_KINDS:
        raise _space_err(source, where, f"unknown spec kind {kind!r}; choose one of "
                                        f"{list(SPEC_KINDS)}" + _did_you_mean(str(kind),
                                                                              list(SPEC_KINDS)))
    if kind in LIST_KINDS:
        return {kind: _check_list(source, base, name, kind, values)}
    return {kind: _check_range(source, base, name, kind, values)}


def _check_list(source: str, base: Config, name: str, kind: str, values: Any) -> list[Any]:
    where = f"params.{name}"
    if not isinstance(values, list) or not values:
        raise _space_err(source, where, f"{kind} needs a non-empty list of values, got {values!r}")
    # Each value must make a valid config; keep the value as the config stores it (1 -> 1.0 for
    # a float field, "1e-4" -> 0.0001), so Tune passes what the trial will use.
    return [_validated_value(source, base, name, f"{kind} value", v) for v in values]


def _check_range(source: str, base: Config, name: str, kind: str, values: Any) -> list[Any]:
    where = f"params.{name}"
    if not isinstance(values, list) or len(values) != 2:
        raise _space_err(source, where, f"{kind} needs [low, high], got {values!r}")
    low, high = (_number(source, where, kind, v, integer=kind == "randint") for v in values)
    if not low < high:
        raise _space_err(source, where, f"{kind} low {low!r} must be < high {high!r}")
    if kind == "loguniform" and low <= 0:
        raise _space_err(source, where, f"loguniform low {low!r} must be > 0")
    # Both ends must give a valid config (randint's high is exclusive: its last value is high-1).
    last = high - 1 if kind == "randint" else high
    _validated_value(source, base, name, f"{kind} low", low)
    _validated_value(source, base, name, f"{kind} high", last)
    return [low, high]


def _number(source: str, where: str, kind: str, value: Any, integer: bool) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            value = float(value)
        except ValueError:
            raise _space_err(source, where, f"{kind} bound {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _space_err(source, where, f"{kind} bound {value!r} is not a number")
    if integer:
        if value != int(value):
            raise _space_err(source, where, f"randint bound {value!r} is not an integer")
        return int(value)
    return float(value)


def _validated_value(source: str, base: Config, name: str, what: str, value: Any) -> Any:
    """Apply one value to the base config and validate; return the value the config stored."""
    try:
        cfg = apply_trial_params(base, {name: value})
    except ConfigError as e:
        reason = str(e).removeprefix("config error: ")
        raise _space_err(source, f"params.{name}", f"{what} {value!r} gives an invalid config: "
                                                   f"{reason}") from None
    return cfg.flat()[name]


def _check_count(source: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _space_err(source, name, f"{value!r}: must be an integer >= 1")
    return value


def _check_choice(source: str, name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise _space_err(source, name, f"{value!r}: choose one of {list(options)}")
    return value


def _check_metric(source: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _space_err(source, "metric", f"{value!r}: need a metric name such as knn_top1")
    if "loss" in value.lower():
        # The MiCL loss divides similarities by the temperature (and its scale moves with the
        # mask ratio), so losses of trials with different settings are not on one scale.
        raise _space_err(source, "metric", f"{value!r}: refusing to rank trials by a loss: "
                         "contrastive losses at different temperatures (or mask ratios) are not "
                         "comparable; rank by a downstream metric such as knn_top1")
    return value


def _check_rank_by(source: str, value: Any) -> str | None:
    if value is None or value in RANK_BY:
        return value
    raise _space_err(source, "rank_by", f"{value!r}: choose one of {list(RANK_BY)} (or leave it "
                     "out to rank by `metric`)")


def _check_search_algorithm(source: str, space: SearchSpace) -> None:
    if space.search != "optuna":
        return
    grids = space.grid_params()
    if grids:
        raise _space_err(source, "search", f"optuna cannot search grids ({', '.join(grids)}); "
                                           "use choice, or search: random")
    if importlib.util.find_spec("optuna") is None:
        raise _space_err(source, "search", "optuna needs the optuna package: "
                                           "pip install -e '.[optuna]' (or use search: random)")
