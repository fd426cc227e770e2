"""The compare layer against a real MLflow store (SQLite in a temp dir): a Tune-style search
(one parent run, four trials over a 2 x 2 mask ratio x temperature grid) and one stand-alone
run, written with the MLflow API the way the pipelines write them."""

import importlib.util
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import sqlite_uri
from mlflow.tracking import MlflowClient
from PIL import Image

from micl.compare import (
    PNG_MAGIC,
    CompareError,
    choose_plot,
    compare,
    comparison_figure,
    comparison_table,
    find_runs,
    format_table,
    log_plot_to_parent,
    write_outputs,
)
from micl.config import Config
from micl.driver import check
from micl.tracking import start_or_resume_run, use_tracking_uri
from micl.tune_space import apply_trial_params

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "micl-test-compare"
# (mask ratio, temperature) -> final kNN top-1 of that trial
FINAL_KNN = {(0.75, 0.05): 0.61, (0.75, 0.1): 0.72, (0.9, 0.05): 0.55, (0.9, 0.1): 0.66}
EPOCHS = 3
# (mask ratio, blr, kappa, final kNN top-1) of a random search
RANDOM_TRIALS = [(0.613, 3.1e-5, 0.0, 0.52), (0.702, 2.2e-4, 0.25, 0.58),
                 (0.718, 8.0e-4, 0.0, 0.49), (0.866, 6.5e-5, 0.25, 0.63),
                 (0.894, 1.4e-5, 0.015625, 0.60)]


def _log_run(params: dict, final_knn: float | None) -> None:
    mlflow.log_params(params)
    for epoch in range(EPOCHS):
        metrics = {"loss": 5.0 - epoch, "lr": 1e-4, "images_per_s": 900.0 + epoch,
                   "skipped": 0.0, "epoch": float(epoch)}
        if final_knn is not None:
            metrics["knn_top1"] = final_knn - 0.1 * (EPOCHS - 1 - epoch)
        mlflow.log_metrics(metrics, step=epoch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding one search (parent + 4 trials) and one stand-alone run."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = sqlite_uri(tmp / "mlflow.db")
    with use_tracking_uri(uri):  # the fluent API writes the store; put back what was before
        exp = mlflow.create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))
        trials = {}
        with mlflow.start_run(experiment_id=exp, run_name="search",
                              tags={"micl.role": "search"}) as parent:
            mlflow.log_param("space", "mask_ratio_temperature")
        for i, ((ratio, temp), knn) in enumerate(FINAL_KNN.items()):
            cfg = apply_trial_params(Config(), {"method.mask_ratio": ratio,
                                                "method.temperature": temp,
                                                "run.name": f"trial-{i}"})
            with mlflow.start_run(experiment_id=exp, run_name=f"trial-{i}",
                                  parent_run_id=parent.info.run_id,
                                  tags={"micl.role": "trial"}) as run:
                _log_run(cfg.flat(), knn)
            trials[run.info.run_id] = (ratio, temp)
        # A random search: every trial draws its own mask ratio, learning rate and kappa.
        with mlflow.start_run(experiment_id=exp, run_name="random-search",
                              tags={"micl.role": "search"}) as random_parent:
            pass
        for i, (ratio, blr, kappa, knn) in enumerate(RANDOM_TRIALS):
            cfg = apply_trial_params(Config(), {"method.mask_ratio": ratio, "optim.blr": blr,
                                                "method.kappa": kappa})
            with mlflow.start_run(experiment_id=exp, run_name=f"random-{i}",
                                  parent_run_id=random_parent.info.run_id,
                                  tags={"micl.role": "trial"}):
                _log_run(cfg.flat(), knn)
        with mlflow.start_run(experiment_id=exp, run_name="pretrain") as solo:
            # A run whose kNN never ran: ranked last. Runs log the checked config (every
            # method field, defaults included), as the trials' apply_trial_params gives it.
            _log_run(check(Config()).flat(), None)
        yield {"uri": uri, "tmp": tmp, "parent": parent.info.run_id, "trials": trials,
               "random_parent": random_parent.info.run_id, "solo": solo.info.run_id}


def test_table_ranks_trials_and_shows_only_differing_params(store):
    runs = find_runs(parent_run_id=store["parent"])
    table = comparison_table(runs, "knn_top1")
    assert len(table) == 4
    assert list(table["knn_top1"]) == sorted(FINAL_KNN.values(), reverse=True)
    assert list(table.columns[:5]) == ["run", "run_name", "status", "method.mask_ratio",
                                       "method.temperature"]
    # Same in every trial (or bookkeeping like run.name): not shown, though every trial logged
    # every method field (check fills in the defaults).
    assert not {"model.name", "optim.blr", "run.name", "method.kappa", "method.negatives",
                "method.name"} & set(table.columns)
    params = runs[runs["run_id"] == table.index[0]].iloc[0]
    assert params["params.method.kappa"] == str(1 / 64)
    assert {"loss", "images_per_s", "epoch"} <= set(table.columns)
    assert "linear_top1" not in table.columns  # not logged, so not shown
    best = table.iloc[0]
    assert (best["method.mask_ratio"], best["method.temperature"]) == (0.75, 0.1)
    assert store["trials"][best.name] == (0.75, 0.1)  # index = full run id
    assert best["run"] == best.name[:8]
    assert best["epoch"] == EPOCHS - 1  # the latest value of each metric
    assert set(table["status"]) == {"FINISHED"}


def test_format_table_is_aligned_text(store):
    table = comparison_table(find_runs(parent_run_id=store["parent"]))
    text = format_table(table)
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].split() == list(table.columns)
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "0.72" in lines[2] and "trial-1" in lines[2]
    # Right-aligned numbers: every row's knn_top1 cell ends at the same column as its header.
    end = lines[0].index("knn_top1") + len("knn_top1")
    assert all(line[end - 1] != " " for line in lines[2:])


def test_outputs_csv_and_heatmap_png(store, tmp_path):
    table = comparison_table(find_runs(parent_run_id=store["parent"]))
    assert choose_plot(table, "knn_top1").kind == "heatmap"
    csv_path, png_path = write_outputs(table, tmp_path / "out", "knn_top1")

    csv = pd.read_csv(csv_path)
    assert len(csv) == 4
    for _, row in csv.iterrows():
        ratio, temp = store["trials"][row["run_id"]]
        assert (row["method.mask_ratio"], row["method.temperature"]) == (ratio, temp)
        assert row["knn_top1"] == pytest.approx(FINAL_KNN[(ratio, temp)])

    assert png_path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 800
        assert "kind=heatmap" in image.info["Description"]
        assert "x=method.mask_ratio" in image.info["Description"]


def test_the_plot_draws_the_tables_values(store):
    """Not only a PNG: the heatmap's cells and the lines' points are the trials' kNN."""
    table = comparison_table(find_runs(parent_run_id=store["parent"]))
    fig, choice = comparison_figure(table, "knn_top1")
    assert (choice.kind, choice.x, choice.group) == ("heatmap", "method.mask_ratio",
                                                    "method.temperature")
    ratios, temps = sorted({r for r, _ in FINAL_KNN}), sorted({t for _, t in FINAL_KNN})
    cells = fig.axes[0].images[0].get_array()  # rows: temperature, columns: mask ratio
    assert cells.tolist() == [[FINAL_KNN[(r, t)] for r in ratios] for t in temps]
    lines = [ax for ax in fig.axes if ax.lines][0].lines
    assert [line.get_label() for line in lines] == [f"method.temperature = {t:g}" for t in temps]
    for line, t in zip(lines, temps, strict=True):
        assert list(line.get_xdata()) == ratios
        assert list(line.get_ydata()) == pytest.approx([FINAL_KNN[(r, t)] for r in ratios])


def test_partial_grid_plots_lines(store, tmp_path):
    runs = find_runs(parent_run_id=store["parent"],
                     filter_string="metrics.knn_top1 > 0.6")  # 3 of the 4 grid points
    table = comparison_table(runs)
    assert len(table) == 3
    choice = choose_plot(table)
    assert (choice.kind, choice.x, choice.group) == ("lines", "method.mask_ratio",
                                                     "method.temperature")
    _, png_path = write_outputs(table, tmp_path, "knn_top1")
    with Image.open(png_path) as image:
        assert "kind=lines" in image.info["Description"]


def test_single_run_plots_bars(store, tmp_path):
    runs = find_runs(parent_run_id=store["parent"],
                     filter_string="params.`method.mask_ratio` = '0.9' and "
                                   "params.`method.temperature` = '0.1'")
    table = comparison_table(runs)
    assert len(table) == 1 and table.iloc[0]["knn_top1"] == pytest.approx(0.66)
    assert choose_plot(table).kind == "bars"
    _, png_path = write_outputs(table, tmp_path, "knn_top1")
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_random_search_plots_one_scatter_panel_per_param(store, tmp_path):
    table = comparison_table(find_runs(parent_run_id=store["random_parent"]))
    assert list(table["knn_top1"]) == sorted((t[-1] for t in RANDOM_TRIALS), reverse=True)
    assert list(table.columns[3:6]) == ["method.mask_ratio", "method.kappa", "optim.blr"]
    assert choose_plot(table).kind == "scatter"
    _, png_path = write_outputs(table, tmp_path, "knn_top1")
    with Image.open(png_path) as image:
        assert "kind=scatter" in image.info["Description"]


def test_experiment_runs_exclude_the_search_parents(store):
    runs = find_runs(experiment=EXPERIMENT, tracking_uri=store["uri"])
    assert not {store["parent"], store["random_parent"]} & set(runs["run_id"])
    assert len(runs) == 4 + len(RANDOM_TRIALS) + 1
    assert {*store["trials"], store["solo"]} <= set(runs["run_id"])
    table = comparison_table(runs)
    assert table.index[-1] == store["solo"]  # no knn_top1: ranked last
    assert len(find_runs(experiment=EXPERIMENT, include_parents=True)) == len(runs) + 2
    # min mode: worst first, still missing values last
    worst_first = comparison_table(runs, mode="min")
    assert worst_first.iloc[0]["knn_top1"] == pytest.approx(0.49)
    assert worst_first.index[-1] == store["solo"]


def test_compare_logs_plot_to_parent(store, tmp_path):
    result = compare(parent_run_id=store["parent"], out_dir=tmp_path / "cmp",
                     tracking_uri=store["uri"])
    assert result.csv_path.is_file() and result.png_path.is_file()
    assert result.logged_to_parent == ["compare/comparison.png", "compare/comparison.csv"]
    logged = {f.path for f in MlflowClient(store["uri"]).list_artifacts(store["parent"],
                                                                        "compare")}
    assert logged == {"compare/comparison.png", "compare/comparison.csv"}
    assert result.text.splitlines()[0].startswith("run")


def test_log_plot_to_parent_directly(store, tmp_path):
    png = tmp_path / "plot.png"
    table = comparison_table(find_runs(parent_run_id=store["parent"]))
    write_outputs(table, tmp_path, "knn_top1")[1].rename(png)
    assert log_plot_to_parent(store["parent"], png, artifact_path="plots") == "plots/plot.png"
    files = MlflowClient(store["uri"]).list_artifacts(store["parent"], "plots")
    assert [f.path for f in files] == ["plots/plot.png"]


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"experiment": "no-such-experiment"}, ["no-such-experiment", "does not exist",
                                                EXPERIMENT]),
        ({"parent_run_id": "0" * 32}, ["no run with id", "0" * 32]),
        ({"experiment": EXPERIMENT, "filter_string": "params.`method.mask_ratio` = '0.1'"},
         ["no runs to compare", "0.1"]),
        ({"experiment": EXPERIMENT, "filter_string": "mask ratio is big"},
         ["MLflow rejected the filter"]),
    ],
)
def test_clear_one_line_errors(store, kwargs, needles):
    with pytest.raises(CompareError) as info:
        find_runs(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_metric_is_a_clear_error(store):
    runs = find_runs(parent_run_id=store["parent"])
    with pytest.raises(CompareError, match="no run has the metric 'linear_top1'.*knn_top1"):
        comparison_table(runs, "linear_top1")


def test_tracking_uri_argument_does_not_leak(store, tmp_path):
    other = f"sqlite:///{tmp_path}/other.db"
    MlflowClient(other).create_experiment("elsewhere", artifact_location=str(tmp_path))
    with pytest.raises(CompareError, match=f"'{EXPERIMENT}' does not exist.*elsewhere"):
        find_runs(experiment=EXPERIMENT, tracking_uri=other)
    assert mlflow.get_tracking_uri() == store["uri"]


def test_compare_leaves_the_default_store_alone(store, tmp_path, monkeypatch):
    # Restoring "the previous URI" naively exports $MLFLOW_TRACKING_URI = <this cwd>/mlflow.db,
    # and every later run or search in the process, from any directory, writes there.
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)  # MLflow's state when nothing was set
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compare(parent_run_id=store["parent"], out_dir=tmp_path / "cmp", tracking_uri=store["uri"])
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.chdir(tmp_path)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_a_new_search_with_an_old_name_gets_a_new_parent(tmp_path):
    cfg = Config()
    cfg.run.tracking_uri, cfg.run.experiment = f"sqlite:///{tmp_path}/mlflow.db", "searches"
    first = start_or_resume_run(cfg, "grid", tags={"micl.role": "search"})
    assert start_or_resume_run(cfg, "grid") == first  # resuming that search
    second = start_or_resume_run(cfg, "grid", resume=False)  # a fresh search, same name
    assert second != first
    assert start_or_resume_run(cfg, "grid") == second  # the newest is the one resumed


def test_missing_sqlite_store_is_not_created(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(CompareError, match="no MLflow database at"):
        find_runs(tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()


def _cli():
    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "pipelines/compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_table_and_paths(store, tmp_path, capsys):
    code = _cli().main(["--parent", store["parent"], "--tracking-uri", store["uri"],
                        "--out", str(tmp_path / "cli"), "--no-log"])
    out = capsys.readouterr().out
    assert code == 0
    assert "method.mask_ratio" in out and "trial-1" in out
    assert str((tmp_path / "cli" / "comparison.csv").resolve()) in out
    assert str((tmp_path / "cli" / "comparison.png").resolve()) in out


def test_cli_error_is_one_line(store, capsys):
    code = _cli().main(["--experiment", "nope", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: experiment 'nope' does not exist") and err.count("\n") == 1
