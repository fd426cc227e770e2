"""One end-to-end Tune search on local Ray, inspected by several tests: two real trials on
Fashion-MNIST under ASHA (a grid over the temperature crossed with a random draw of the mask
ratio), a real MLflow store, compare outputs, and a second call with the same name (what a
user does to resume an interrupted search)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import metric_history, sqlite_uri
from mlflow.tracking import MlflowClient
from test_pipeline import tiny_config

from micl.compare import compare
from micl.tune import run_search
from micl.tune_space import parse_space

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian package dataset-fashion-mnist missing")]

TEMPERATURES = [0.02, 2.0]  # a grid, run in this order: the second is far too soft to learn
MASK_RATIOS = (0.25, 0.5)  # a uniform draw per trial
EPOCHS = 3


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    """(base, space, result, cwd): 2 trials under ASHA, up to 3 epochs each. Trials run one at
    a time on 2 CPUs: the first runs every epoch, the second is judged against it at epoch 1."""
    tmp = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as mp:
        # The default store and storage (./mlflow.db, ./runs) must reach the trials, which run
        # in directories of their own.
        mp.chdir(tmp)
        base = tiny_config(
            tmp, "run.tracking_uri=", "run.storage_path=", "run.num_workers=1",
            "run.cpus_per_worker=1", "run.experiment=micl-tune-test",
            "data.source=fashion_mnist", "model.img_size=28", "model.in_chans=1",
            # 2,048 images an epoch: at 512, 24 steps moved kNN by +-0.05 around the random
            # encoder's (0.50-0.56) from one seed to the next; at 2,048 it rose by 0.09-0.14
            # (local-mode runs of the T = 0.02 trial, seeds 0 and 1), and 512 queries halve
            # the noise of the estimate.
            "data.mean=[0.286]", "data.std=[0.353]", "data.limit_train=2048",
            "data.knn_bank_size=1024", "data.knn_query_size=512", "data.batch_size=64",
            "data.map_batch_size=64", f"optim.epochs={EPOCHS}", "optim.warmup_epochs=0",
            "optim.blr=0.02")
        space = parse_space({"params": {"method.mask_ratio": {"uniform": list(MASK_RATIOS)},
                                        "method.temperature": {"grid": TEMPERATURES}},
                             "scheduler": "asha", "rank_by": "linear_top1"}, base=base)
        result = run_search(base, space, name="search")
        yield base, space, result, tmp


def children(result, experiment: str = "micl-tune-test"):
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.parent_run_id}'")


def test_parent_children_and_compare(search):
    _, _, result, tmp = search
    assert result.tracking_uri == f"sqlite:///{tmp / 'mlflow.db'}"  # the cwd default
    assert len(result.trials) == 2
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).data.tags["micl.role"] == "search"
    runs = children(result)
    assert sorted(float(c.data.params["method.temperature"]) for c in runs) == TEMPERATURES
    ratios = [float(c.data.params["method.mask_ratio"]) for c in runs]
    # One trial at a time on 2 CPUs (each trial's Ray Data needs the CPU its worker leaves).
    first, second = sorted(runs, key=lambda c: c.info.start_time)
    assert second.info.start_time >= first.info.end_time
    assert all(MASK_RATIOS[0] <= r <= MASK_RATIOS[1] for r in ratios) and ratios[0] != ratios[1]
    assert all("knn_top1" in c.data.metrics for c in runs)
    report = compare(parent_run_id=result.parent_run_id, out_dir=tmp / "cmp",
                     tracking_uri=result.tracking_uri)
    knn = list(report.table["knn_top1"])
    assert knn == sorted(knn, reverse=True) and len(knn) == 2
    with open(report.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["method.temperature"]) for r in rows) == TEMPERATURES
    assert sorted(float(r["method.mask_ratio"]) for r in rows) == sorted(ratios)
    # ASHA stops on kNN; the search ranks the trials that trained every epoch by an
    # end-of-trial linear probe (rank_by), logged to each trial's run. A trial that ran to the
    # end finished cleanly: its run is FINISHED and holds the exported encoder.
    complete = [c for c in runs if c.data.metrics["epoch"] == EPOCHS]
    assert complete and all("linear_top1" in c.data.metrics for c in complete)
    assert result.best_metric == max(c.data.metrics["linear_top1"] for c in complete)
    finished = [c for c in runs if c.info.status == "FINISHED"]
    assert finished and all(c.data.metrics["epoch"] == EPOCHS for c in finished)
    assert {a.path for a in client.list_artifacts(finished[0].info.run_id, "encoder")} == {
        "encoder/encoder_timm.pth", "encoder/timm_model.json"}
    assert client.get_run(result.parent_run_id).data.metrics["best_linear_top1"] == \
        result.best_metric
    assert Path(report.png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "compare")}
    assert any(p.endswith(".png") for p in logged)


def test_asha_stops_poor_trials_early(search):
    _, _, result, _ = search
    epochs = {t["params"]["method.temperature"]: t["epochs"] for t in result.trials}
    # The first trial ran every epoch; ASHA stopped the soft one at a rung (1 or 2) before the
    # last epoch. Which rung depends on the mask ratios drawn (seeded by run.seed).
    assert epochs[0.02] == EPOCHS and epochs[2.0] < EPOCHS, epochs
    status = {c.info.status for c in children(result)}
    assert "RUNNING" not in status  # stopped trials are closed
    assert "KILLED" in status


def test_the_best_trial_beats_its_random_encoder(search):
    _, _, result, _ = search
    best = max(children(result), key=lambda c: c.data.metrics["knn_top1"])
    by_step = metric_history(MlflowClient(result.tracking_uri), best.info.run_id, "knn_top1")
    assert by_step[max(by_step)] > by_step[0], by_step


def test_the_same_name_restores_the_search(search):
    """Calling the search again with its name restores it through Tune: nothing is re-run
    (no trial errored) and the trials stay under the same MLflow parent."""
    base, space, first, tmp = search
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        again = run_search(base, space, name="search")
    assert again.parent_run_id == first.parent_run_id
    assert len(children(again)) == 2
    assert sorted(t["epochs"] for t in again.trials) == sorted(t["epochs"] for t in
                                                                first.trials)


def test_cli_search_where_no_trial_scores_says_why_and_exits_1(ray_local, tmp_path, capsys):
    """pipelines/tune.py when every trial fails (here: fewer training images than one batch,
    found as each trial builds its trainer): each trial's cause on stderr, exit code 1, and
    the search's parent run FAILED."""
    from pipelines.tune import main

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  method.temperature: {grid: [0.1]}\nscheduler: fifo\n")
    config = [f"--set={o}" for o in (
        "data.source=synthetic", "data.synthetic_size=8", "data.batch_size=16",
        "model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "run.num_workers=1", "run.cpus_per_worker=1",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri={sqlite_uri(tmp_path / 'm.db')}")]
    code = main(["--space", str(space), "--name", "doomed", "--out", str(tmp_path / "cmp"),
                 *config])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "fewer than one batch per worker" in err and "no trial reported knn_top1" in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    parents = client.search_runs([client.get_experiment_by_name("micl-pretrain").experiment_id],
                                 "tags.`micl.role` = 'search'")
    assert [p.info.status for p in parents] == ["FAILED"]
    trials = client.search_runs([parents[0].info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert [t.info.status for t in trials] == ["FAILED"]  # not left RUNNING


def test_a_one_worker_trial_that_fails_is_retried_from_its_checkpoint(ray_local, tmp_path,
                                                                      toy_registered):
    """A one-worker trial trains in its own process; when that fails (here a planned error
    in epoch 2, tests/toy_method.py), Tune starts the trial again (run.max_failures = 1) and
    the new process resumes from the epoch-1 checkpoint on storage, in the same MLflow run."""
    marker = tmp_path / "failed-once"
    base = tiny_config(tmp_path, "data.source=synthetic", "data.synthetic_size=64",
                       "method.name=toy_views", "run.import_modules=[toy_method]",
                       "method.fail_at_step=12", f"method.fail_marker={marker}",
                       "run.num_workers=1", "run.cpus_per_worker=1", "run.max_failures=1",
                       "optim.epochs=2", "run.experiment=micl-tune-retry")
    space = parse_space({"params": {"method.logit_scale": {"grid": [10.0]}},
                         "scheduler": "fifo"}, base=base)
    result = run_search(base, space, name="retried")
    assert marker.exists()  # epoch 2 (steps 9-16) failed once
    [trial] = result.trials
    assert trial["error"] is None and trial["epochs"] == 2, trial
    client = MlflowClient(result.tracking_uri)
    [run] = children(result, "micl-tune-retry")
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2]  # epoch 1 not trained (or logged) again
    steps = metric_history(client, run.info.run_id, "step")
    assert steps == {1: 8, 2: 16}  # optimizer steps done after each epoch (8 an epoch)
