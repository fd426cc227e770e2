"""Compare pre-training runs recorded in MLflow: a ranked table, a CSV and a plot.

    result = compare(parent_run_id="<search run id>")   # the trials of one Tune search
    print(result.text)                                   # also in result.csv_path / png_path

The MLflow layout this reads (what the training and tune pipelines write): params are the
flattened config with dotted names (`method.mask_ratio` -> "0.9"); per-epoch metrics `loss`,
`lr`, `images_per_s`, `knn_top1`, `skipped`, `epoch` (the table shows each metric's latest
value); a Tune search is one parent run tagged `micl.role=search` whose trials are child runs
tagged `micl.role=trial` and `mlflow.parentRunId`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from micl.tracking import use_tracking_uri

DEFAULT_EXPERIMENT = "micl-pretrain"
# Metrics shown when present, in this order (the ranking metric always comes first).
KEY_METRICS = ("knn_top1", "linear_top1", "finetune_top1", "loss", "images_per_s", "epoch")
# Params that say where a run lives, not what it trained: they differ between any two runs and
# would only clutter the table.
BOOKKEEPING_PARAMS = ("run.name", "run.storage_path", "run.tracking_uri", "run.experiment")
# The searched fields people look for first.
PREFERRED_PARAMS = ("method.mask_ratio", "method.temperature")
ID_COLUMNS = ("run", "run_name", "status")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_GROUPS = 8  # more distinct values than this: not worth a colour each
MAX_PANELS = 6  # scatter panels (one per differing param)
MAX_TICKS = 10  # label every x value up to this many


class CompareError(RuntimeError):
    """Nothing to compare (no such experiment or run, no matching runs, no such metric)."""


@dataclass
class PlotChoice:
    """What `write_outputs` draws: `kind` is "heatmap", "lines" or "bars"."""

    kind: str
    x: str | None = None
    group: str | None = None  # heatmap: the y axis; lines: one line per value


@dataclass
class CompareResult:
    table: pd.DataFrame
    text: str
    csv_path: Path
    png_path: Path
    logged_to_parent: list[str]


# --- finding runs -----------------------------------------------------------------------------


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The given URI, else MLflow's: `$MLFLOW_TRACKING_URI`, `mlflow.set_tracking_uri`, or
    (MLflow 3's default, matching this project's) `sqlite:///<absolute cwd>/mlflow.db`."""
    return tracking_uri or mlflow.get_tracking_uri()


def _tracking(tracking_uri: str | None) -> contextlib.AbstractContextManager[str]:
    """Point the fluent MLflow API at `tracking_uri` for a moment (search_runs has no argument
    for it), then put back what the caller had."""
    return use_tracking_uri(resolve_tracking_uri(tracking_uri))


def find_runs(experiment: str | None = None, parent_run_id: str | None = None,
              filter_string: str | None = None, tracking_uri: str | None = None,
              include_parents: bool = False) -> pd.DataFrame:
    """Runs as `mlflow.search_runs` returns them (columns `params.*`, `metrics.*`, `tags.*`).

    `parent_run_id` selects the trials of one search (in the parent's experiment unless
    `experiment` is given); otherwise all runs of `experiment` (default micl-pretrain).
    Search parents (tag `micl.role = search`) are left out unless `include_parents`.
    Raises CompareError when the experiment or parent does not exist or nothing matches.
    """
    _check_store(resolve_tracking_uri(tracking_uri))
    with _tracking(tracking_uri) as uri:
        client = MlflowClient(uri)
        if parent_run_id:
            experiment_id = _parent_experiment(client, parent_run_id, uri)
            where = f"children of run {parent_run_id}"
        if experiment or not parent_run_id:
            name = experiment or DEFAULT_EXPERIMENT
            experiment_id = _experiment_id(client, name, uri)
            where = (f"{where} in experiment {name!r}" if parent_run_id
                     else f"runs of experiment {name!r}")
        filters = [f"tags.mlflow.parentRunId = '{parent_run_id}'"] if parent_run_id else []
        filters += [filter_string] if filter_string else []
        query = " and ".join(filters)
        try:
            runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=query)
        except MlflowException as e:
            raise CompareError(f"MLflow rejected the filter {query!r}: "
                               f"{_first_line(e.message)}") from None
    if not include_parents and "tags.micl.role" in runs.columns:
        runs = runs[runs["tags.micl.role"] != "search"]
    if runs.empty:
        suffix = f" match the filter {filter_string!r}" if filter_string else " exist"
        raise CompareError(f"no runs to compare: no {where}{suffix} ({uri})")
    return runs.reset_index(drop=True)


def _check_store(uri: str) -> None:
    """A SQLite store that is not there is a wrong directory or URI; opening it would only
    create an empty database and then report that the experiment does not exist."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(f"no MLflow database at {path} (from {uri}): run from the "
                               "directory holding mlflow.db, or pass --tracking-uri")


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments(max_results=50))
        raise CompareError(f"experiment {name!r} does not exist in {uri}; "
                           f"experiments there: {known}")
    return exp.experiment_id


def _parent_experiment(client: MlflowClient, run_id: str, uri: str) -> str:
    try:
        return client.get_run(run_id).info.experiment_id
    except MlflowException:
        raise CompareError(f"no run with id {run_id!r} in {uri}") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# --- the table --------------------------------------------------------------------------------


def comparison_table(runs: pd.DataFrame, metric: str = "knn_top1", mode: str = "max"
                     ) -> pd.DataFrame:
    """One row per run: short id, name, status, the params that differ across the runs, then
    the metrics (`metric` first, then those of KEY_METRICS present), best `metric` first and
    runs without it last. The index is the full MLflow run id."""
    if runs.empty:
        raise CompareError("no runs to compare")
    if mode not in ("max", "min"):
        raise CompareError(f"mode {mode!r}: choose max or min")
    metric_cols = [m for m in dict.fromkeys([metric, *KEY_METRICS]) if f"metrics.{m}" in runs]
    if metric not in metric_cols:
        logged = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise CompareError(f"no run has the metric {metric!r}; logged metrics: {logged}")
    table = pd.DataFrame({
        "run": runs["run_id"].str[:8],
        "run_name": runs.get("tags.mlflow.runName", pd.Series("", index=runs.index)),
        "status": runs["status"],
    })
    for name in differing_params(runs):
        table[name] = _maybe_numeric(runs[f"params.{name}"])
    for name in metric_cols:
        table[name] = runs[f"metrics.{name}"].astype(float)
    table.index = pd.Index(runs["run_id"], name="run_id")
    return table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable")


def differing_params(runs: pd.DataFrame) -> list[str]:
    """Dotted param names whose value is not the same in every run (a missing value counts
    as a value), searched fields first."""
    names = [c.removeprefix("params.") for c in runs.columns if c.startswith("params.")]
    differ = [n for n in names if n not in BOOKKEEPING_PARAMS
              and runs[f"params.{n}"].astype(object).fillna("<unset>").nunique() > 1]
    return sorted(differ, key=lambda n: (n not in PREFERRED_PARAMS,
                                         PREFERRED_PARAMS.index(n) if n in PREFERRED_PARAMS
                                         else 0, n))


def _maybe_numeric(values: pd.Series) -> pd.Series:
    """MLflow stores params as text; "0.75" -> 0.75 so that columns sort and plot as numbers."""
    try:
        return pd.to_numeric(values)
    except (ValueError, TypeError):
        return values


def _param_columns(table: pd.DataFrame, metric: str) -> list[str]:
    skip = {*ID_COLUMNS, metric, *KEY_METRICS}
    return [c for c in table.columns if c not in skip]


def format_table(table: pd.DataFrame) -> str:
    """Aligned plain text: numbers right-aligned, text left-aligned, missing values as '-'."""
    columns = list(table.columns)
    # Params (dotted names) keep more digits than metrics: people copy them into configs.
    cells = [[_cell(v, digits=6 if "." in c else 4) for v in table[c]] for c in columns]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in columns]
    widths = [max([len(c), *map(len, col)]) for c, col in zip(columns, cells, strict=True)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rows = [line(columns), line(["-" * w for w in widths])]
    rows += [line([col[i] for col in cells]) for i in range(len(table))]
    return "\n".join(rows)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):
        return _number(float(value), digits)
    return str(value)


def _number(v: float, digits: int = 4) -> str:
    """Short text for a number: 9.0 -> "9", 1234.56 -> "1234.6", 0.71234 -> "0.7123"."""
    if v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}g}"


# --- outputs ----------------------------------------------------------------------------------


def write_outputs(table: pd.DataFrame, out_dir: str | Path, metric: str = "knn_top1"
                  ) -> tuple[Path, Path]:
    """Write `comparison.csv` (the table, full run ids first) and `comparison.png` (see
    `choose_plot`) under `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "comparison.csv", out / "comparison.png"
    table.to_csv(csv_path)
    plot_table(table, metric, png_path)
    return csv_path, png_path


def choose_plot(table: pd.DataFrame, metric: str = "knn_top1") -> PlotChoice:
    """What to draw for this table:

    - "heatmap" (plus lines): exactly two params differ and every pair of their values was run;
    - "lines": `metric` against one param (mask ratio when it varies), one line per value of a
      second (temperature when it varies), when runs share a few x values (a grid);
    - "scatter": one panel per differing param, otherwise (a random search);
    - "bars": one bar per run, when no param differs.
    """
    params = _param_columns(table, metric)
    if not params:
        return PlotChoice("bars")
    x = "method.mask_ratio" if "method.mask_ratio" in params else params[0]
    others = [p for p in params if p != x]
    if len(params) == 2 and _is_full_grid(table, x, others[0]):
        return PlotChoice("heatmap", x, others[0])
    group = "method.temperature" if "method.temperature" in others else (
        others[0] if len(others) == 1 else None)
    if group is not None and table[group].nunique() > MAX_GROUPS:
        group = None  # a line (or colour) per value only when it takes a few values
    # A grid: a few well-spaced x values, shared between runs or with little else varying.
    # Random draws (distinct, irregular values, several params at once) get scatter panels.
    xs = _sorted_values(table[x])
    numeric = pd.api.types.is_numeric_dtype(table[x])
    spaced = not numeric or _well_spaced(xs, _log_scale(xs, numeric))
    grid_like = spaced and (table[x].nunique() < len(table) or len(params) <= 2)
    kind = "lines" if grid_like else "scatter"
    return PlotChoice(kind, x, group)


def _is_full_grid(table: pd.DataFrame, x: str, y: str) -> bool:
    pairs = set(zip(table[x].astype(str), table[y].astype(str), strict=True))
    return len(pairs) == table[x].nunique(dropna=False) * table[y].nunique(dropna=False)


def plot_table(table: pd.DataFrame, metric: str, png_path: str | Path) -> PlotChoice:
    """Draw the comparison plot to `png_path` (PNG, Agg, no pyplot state); return the choice."""
    fig, choice = comparison_figure(table, metric)
    description = f"kind={choice.kind}; x={choice.x}; group={choice.group}; metric={metric}"
    fig.savefig(png_path, dpi=110, metadata={"Title": f"micl compare: {metric}",
                                              "Description": description})
    return choice


def comparison_figure(table: pd.DataFrame, metric: str) -> tuple[Any, PlotChoice]:
    """The comparison plot as a matplotlib Figure (not yet rendered), and what it shows."""
    from matplotlib.figure import Figure  # the OO API renders with Agg and touches no backend

    choice = choose_plot(table, metric)
    n = len(table)
    if choice.kind == "heatmap":
        fig = Figure(figsize=(12, 4.8), layout="constrained")
        ax_heat, ax_lines = fig.subplots(1, 2, width_ratios=[1.1, 1])
        _draw_heatmap(fig, ax_heat, table, metric, choice.x, choice.group)
        _draw_lines(ax_lines, table, metric, choice.x, choice.group)
    elif choice.kind == "lines":
        fig = Figure(figsize=(7, 4.8), layout="constrained")
        _draw_lines(fig.subplots(), table, metric, choice.x, choice.group)
    elif choice.kind == "scatter":
        params = _param_columns(table, metric)[:MAX_PANELS]
        cols = {1: 1, 2: 2, 4: 2}.get(len(params), 3)
        rows = math.ceil(len(params) / cols)
        fig = Figure(figsize=(4.3 * cols, 3.8 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
        for i, (ax, param) in enumerate(zip(axes, params, strict=False)):
            group = choice.group if choice.group != param else None
            _draw_scatter(ax, table, metric, param, group, legend=i == 0, ylabel=i % cols == 0)
        for ax in axes[len(params):]:
            ax.set_visible(False)
    else:
        fig = Figure(figsize=(max(6, 0.6 * n + 2), 4.8), layout="constrained")
        _draw_bars(fig.subplots(), table, metric)
    fig.suptitle(f"{metric} of {n} run{'s' * (n != 1)}", fontsize=12)
    return fig, choice


def _sorted_values(values: pd.Series) -> list[Any]:
    unique = list(dict.fromkeys(values.dropna().tolist()))
    try:
        return sorted(unique)
    except TypeError:  # mixed types: keep the order of appearance
        return unique


def _draw_heatmap(fig: Any, ax: Any, table: pd.DataFrame, metric: str, x: str, y: str) -> None:
    xs, ys = _sorted_values(table[x]), _sorted_values(table[y])
    means = table.groupby([y, x])[metric].mean()
    counts = table.groupby([y, x])[metric].count()
    grid = np.full((len(ys), len(xs)), np.nan)
    for (yv, xv), value in means.items():
        grid[ys.index(yv), xs.index(xv)] = value
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"{metric} (mean per cell)")
    best = np.nanmax(grid) if np.isfinite(grid).any() else np.nan
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            value = grid[i, j]
            text = "n/a" if math.isnan(value) else _number(float(value))
            if counts.get((yv, xv), 0) > 1:
                text += f"\n(n={counts[(yv, xv)]})"
            # Dark text on the bright end of viridis, white on the dark end.
            shade = image.norm(value) if not math.isnan(value) else 0.0
            ax.text(j, i, text, ha="center", va="center", fontsize=11,
                    color="black" if shade > 0.6 else "white",
                    fontweight="bold" if value == best else "normal")
    ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_label(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{metric}: {x} x {y} (best in bold)", fontsize=10)


def _draw_lines(ax: Any, table: pd.DataFrame, metric: str, x: str, group: str | None) -> None:
    numeric_x = pd.api.types.is_numeric_dtype(table[x])
    xs = _sorted_values(table[x])
    position = {v: (v if numeric_x else i) for i, v in enumerate(xs)}
    groups = _sorted_values(table[group]) if group else [None]
    for g in groups:
        rows = table if g is None else table[table[group] == g]
        rows = rows.dropna(subset=[x])
        means = rows.groupby(x)[metric].mean().dropna()
        if means.empty:
            continue
        points = sorted(means.items(), key=lambda kv: xs.index(kv[0]))
        label = None if g is None else f"{group} = {_label(g)}"
        ax.plot([position[k] for k, _ in points], [v for _, v in points], marker="o",
                label=label)
        if len(rows) > len(means):  # repeats or other differing params: show every run too
            ax.scatter([position[v] for v in rows[x]], rows[metric], s=12, alpha=0.4,
                       color=ax.lines[-1].get_color())
    _format_x_axis(ax, xs, position, numeric_x)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if group:
        ax.legend(fontsize=9)
    others = [p for p in _param_columns(table, metric) if p not in (x, group)]
    title = f"{metric} vs {x}"
    if others:
        title += f" (mean over {', '.join(others)})"
    ax.set_title(title, fontsize=10)


def _draw_scatter(ax: Any, table: pd.DataFrame, metric: str, x: str, group: str | None,
                  legend: bool, ylabel: bool) -> None:
    """Every run as one point of `metric` against `x`, coloured by `group`'s value."""
    numeric_x = pd.api.types.is_numeric_dtype(table[x])
    xs = _sorted_values(table[x])
    position = {v: (v if numeric_x else i) for i, v in enumerate(xs)}
    rows = table.dropna(subset=[x, metric])
    for g in _sorted_values(rows[group]) if group else [None]:
        part = rows if g is None else rows[rows[group] == g]
        ax.scatter([position[v] for v in part[x]], part[metric], s=36, alpha=0.85,
                   label=None if g is None else f"{group} = {_label(g)}")
    _format_x_axis(ax, xs, position, numeric_x, tick_each=False)
    ax.set_xlabel(x)
    if ylabel:
        ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if legend and group:
        ax.legend(fontsize=8)


def _format_x_axis(ax: Any, xs: list[Any], position: dict[Any, Any], numeric: bool,
                   tick_each: bool = True) -> None:
    """Log scale for wide positive ranges (learning rates); a labelled tick per value for
    categories, and for a few well-spaced numbers (a grid) when `tick_each`; else matplotlib's
    own ticks (labels of close values would overlap)."""
    if not xs:
        return
    log = _log_scale(xs, numeric)
    if log:
        ax.set_xscale("log")
    if not numeric or (tick_each and _well_spaced(xs, log)):
        ax.set_xticks([position[v] for v in xs], [_label(v) for v in xs])


def _log_scale(xs: list[Any], numeric: bool) -> bool:
    return bool(numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 20)


def _well_spaced(xs: list[float], log: bool) -> bool:
    if len(xs) > MAX_TICKS:
        return False
    points = np.log10(xs) if log else np.asarray(xs, dtype=float)
    span = points.max() - points.min()
    return len(xs) < 2 or bool(np.diff(points).min() >= span / 12)


def _draw_bars(ax: Any, table: pd.DataFrame, metric: str) -> None:
    labels = [name if isinstance(name, str) and name else run
              for name, run in zip(table["run_name"], table["run"], strict=True)]
    values = table[metric].fillna(0.0)
    bars = ax.bar(range(len(table)), values, width=0.6, color="tab:blue")
    ax.bar_label(bars, [_cell(v) for v in table[metric]], fontsize=9)
    ax.set_xlim(-0.8, max(len(table), 3) - 0.2)  # one or two bars: not a wall of colour
    ax.set_xticks(range(len(table)), labels, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per run (no param differs)", fontsize=10)


def _label(value: Any) -> str:
    return _number(float(value)) if isinstance(value, int | float | np.number) else str(value)


def log_plot_to_parent(parent_run_id: str, png_path: str | Path,
                       tracking_uri: str | None = None, artifact_path: str = "compare") -> str:
    """Log `png_path` as an artifact of the parent (search) run; return its artifact path."""
    return _log_artifact(parent_run_id, png_path, tracking_uri, artifact_path)


def _log_artifact(run_id: str, path: str | Path, tracking_uri: str | None,
                  artifact_path: str) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    except MlflowException as e:
        raise CompareError(f"could not log {path} to run {run_id} ({uri}): "
                           f"{_first_line(e.message)}") from None
    return f"{artifact_path}/{Path(path).name}"


# --- all together -----------------------------------------------------------------------------


def compare(experiment: str | None = None, parent_run_id: str | None = None,
            filter_string: str | None = None, metric: str = "knn_top1", mode: str = "max",
            out_dir: str | Path = "compare", tracking_uri: str | None = None,
            log_to_parent: bool = True) -> CompareResult:
    """Find the runs, rank them, write the CSV and PNG; with a parent run, also log both to it
    (so the search's plot lives with the search in MLflow)."""
    runs = find_runs(experiment, parent_run_id, filter_string, tracking_uri)
    table = comparison_table(runs, metric, mode)
    csv_path, png_path = write_outputs(table, out_dir, metric)
    logged = []
    if parent_run_id and log_to_parent:
        logged.append(log_plot_to_parent(parent_run_id, png_path, tracking_uri))
        logged.append(_log_artifact(parent_run_id, csv_path, tracking_uri, "compare"))
    return CompareResult(table, format_table(table), csv_path, png_path, logged)
