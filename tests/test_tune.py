"""End-to-end Tune searches on local Ray: real trials, a real MLflow store, compare outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_pipeline import tiny_config

from micl.compare import compare
from micl.tune import run_search
from micl.tune_space import parse_space

pytestmark = pytest.mark.e2e
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def base_config(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=96",
                       "data.batch_size=16", "data.map_batch_size=32", "run.num_workers=1",
                       "run.cpus_per_worker=1", "run.experiment=micl-tune-test", *overrides)


def test_grid_search_parent_children_and_compare(ray_local, tmp_path, monkeypatch):
    # The default store and storage (./mlflow.db, ./runs) must reach the trials, which run in
    # directories of their own.
    monkeypatch.chdir(tmp_path)
    base = base_config(tmp_path, "run.tracking_uri=", "run.storage_path=")
    space = parse_space({"params": {"method.mask_ratio": {"grid": [0.5, 0.75]},
                                    "method.temperature": {"grid": [0.05, 0.2]}},
                         "scheduler": "fifo"}, base=base)
    result = run_search(base, space, name="grid")
    assert len(result.trials) == 4 and all(t["epochs"] == 2 for t in result.trials)

    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("micl-tune-test")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["micl.role"] == "search"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4
    combos = {(c.data.params["method.mask_ratio"], c.data.params["method.temperature"])
              for c in children}
    assert combos == {("0.5", "0.05"), ("0.5", "0.2"), ("0.75", "0.05"), ("0.75", "0.2")}
    assert all("knn_top1" in c.data.metrics for c in children)
    assert all(c.info.status == "FINISHED" for c in children)

    report = compare(parent_run_id=result.parent_run_id, out_dir=tmp_path / "cmp",
                     tracking_uri=result.tracking_uri)
    knn = list(report.table["knn_top1"])
    assert knn == sorted(knn, reverse=True) and len(knn) == 4
    with open(report.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(float(r["method.mask_ratio"]), float(r["method.temperature"])) for r in rows} == {
        (0.5, 0.05), (0.5, 0.2), (0.75, 0.05), (0.75, 0.2)}
    assert Path(report.png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "compare")}
    assert any(p.endswith(".png") for p in logged)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist missing")
def test_asha_stops_poor_trials_early(ray_local, tmp_path):
    base = base_config(tmp_path, "data.source=fashion_mnist", "model.img_size=28",
                       "model.in_chans=1", "data.mean=[0.286]", "data.std=[0.353]",
                       "data.limit_train=512", "data.knn_bank_size=512",
                       "data.knn_query_size=256", "data.batch_size=64", "optim.epochs=4",
                       "method.mask_ratio=0.5")
    space = parse_space({"params": {"method.temperature": {"grid": [0.02, 0.1, 0.5, 2.0]}},
                         "scheduler": "asha"}, base=base)
    result = run_search(base, space, name="asha")
    epochs = sorted(t["epochs"] for t in result.trials)
    assert len(epochs) == 4 and epochs[-1] == 4
    assert epochs[0] < 4, epochs  # at least one trial stopped before the last epoch
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("micl-tune-test")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert "RUNNING" not in {c.info.status for c in children}  # stopped trials are closed
