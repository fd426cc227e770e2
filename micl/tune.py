"""Ray Tune over the pre-training pipeline (Ray Train V2 style).

A trial with one worker (run.num_workers = 1) runs the training loop in the trial's own
process, which holds the worker's resources (its CPUs, GPU share and run.worker_resources)
and reports each epoch to Tune itself: it starts no Ray Train controller, worker and helper
processes, about 14 s of every tiny trial on 2 cores (BENCHMARKS.md). A trial with several
workers builds and fits a `TorchTrainer`, whose reports reach Tune through
`TuneReportCallback`. Trials are ranked by a downstream metric
(`knn_top1`), never by the contrastive loss: losses at different temperatures don't compare.
With `rank_by: linear_top1` each trial that trained every epoch is linear-probed at the end of
the search and the search ranks by that, while ASHA keeps stopping trials on the per-epoch kNN.
One MLflow parent run records the search; each trial is a child run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback

from micl.artifacts import latest_checkpoint_on_storage
from micl.config import Config, from_dict, to_yaml
from micl.driver import (
    build_trainer,
    check,
    connect_ray,
    evaluate_run,
    fit_inputs,
    fit_tracked,
    resolve,
    trains_alone,
    worker_resources,
)
from micl.tracking import (
    ROLE_TAG,
    RunLogger,
    mlflow_client,
    source_tags,
    start_or_resume_run,
)
from micl.train import SoloHost, seal_spec, train_loop_per_worker
from micl.tune_space import SearchSpace, apply_trial_params

SEARCH_TAG = "micl.search"  # the search name, on the parent and on every trial


@dataclass
class SearchResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    best_params: dict[str, Any]
    best_metric: float | None
    trials: list[dict[str, Any]]  # per trial: params, metric, epochs trained, status
    path: str


def concurrent_trials(cfg: Config, space: SearchSpace,
                      resources: dict[str, float] | None = None) -> int:
    """How many trials fit at once in the cluster's `resources` (default: Ray's view) while
    leaving every trial's Ray Data a CPU of its own; with run.gpus_per_worker = 0.5, two
    single-worker trials share each GPU. The custom resources of run.worker_resources count
    too: trials beyond them would hold their CPUs waiting for workers that cannot start."""
    if space.max_concurrent_trials:
        return space.max_concurrent_trials
    res = ray.cluster_resources() if resources is None else resources
    per_trial_cpu = cfg.run.num_workers * cfg.run.cpus_per_worker + max(cfg.data.data_cpus, 1)
    fits = int(res.get("CPU", 1) // per_trial_cpu)
    for name, amount in worker_resources(cfg).items():  # GPUs and custom resources
        if name != "CPU":
            fits = min(fits, int(res.get(name, 0) // (max(cfg.run.num_workers, 1) * amount)))
    return max(1, min(fits, space.num_trials()))


def _scheduler(space: SearchSpace, cfg: Config):
    if space.scheduler == "fifo":
        return None
    # Rungs at 1, 2, 4, ... epochs; keep the top half at each rung. max_t is one past the last
    # epoch: ASHA stops a trial the moment it reports max_t, which would tear it down before
    # its loop exports the encoder and its MLflow run is ended.
    return tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs + 1,
                                         grace_period=1, reduction_factor=2)


def _search_alg(space: SearchSpace, concurrency: int, seed: int):
    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return tune.search.ConcurrencyLimiter(OptunaSearch(seed=seed),
                                              max_concurrent=concurrency)
    # random / grid: Tune's own generator, seeded by run.seed so that a search draws the same
    # trials again (unseeded, every run of a random search would be a different search). It
    # takes the concurrency limit itself: TuneConfig's applies only when Tune builds it.
    return tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


def trial_resources(cfg: Config) -> PlacementGroupFactory:
    """What a trial's own process holds: the worker's resources when it trains there; else
    nothing but a little memory (Ray rejects an empty request), its workers hold the rest."""
    if trains_alone(cfg):
        return PlacementGroupFactory([worker_resources(cfg)])
    return PlacementGroupFactory([{"memory": 64 * 2**20}])


@dataclass
class TrialFit:
    """The fit of a one-worker trial, in the trial's process (see `fit_tracked`)."""

    cfg: Config
    run_id: str

    def fit(self) -> None:
        spec, datasets = fit_inputs(self.cfg, self.cfg.run.name, self.run_id)
        train_loop_per_worker(seal_spec(spec),
                              SoloHost(datasets, tune.report, self.cfg.run.use_gpu))


def make_trainable(base: Config, search_name: str, parent_run_id: str):
    source = source_tags()  # the driver's script and commit (a trial runs in a Ray worker)

    def train_trial(params: dict[str, Any]) -> None:
        cfg = apply_trial_params(base, params)
        trial_id = tune.get_context().get_trial_id()
        cfg.run.name = f"{search_name}-{trial_id}"  # stable per trial: a restarted trial resumes
        cfg.run.eval_every = 1  # the scheduler compares trials every epoch
        ray.data.DataContext.get_current().enable_progress_bars = False
        run_id = start_or_resume_run(cfg, cfg.run.name, parent_run_id=parent_run_id,
                                     tags={**source, ROLE_TAG: "trial", SEARCH_TAG: search_name,
                                           "micl.trial_id": trial_id})
        # The trial's run ends FAILED when building or fitting fails, not left RUNNING.
        fit_tracked(lambda: TrialFit(cfg, run_id) if trains_alone(cfg) else
                    build_trainer(cfg, cfg.run.name, run_id, callbacks=[TuneReportCallback()]),
                    RunLogger(cfg.run.tracking_uri, run_id))

    return train_trial


def _parent_run(base: Config, name: str, space: SearchSpace, resume: bool) -> str:
    # A new search gets a new parent even when an older search had this name, so that its
    # children (found by parent id) are this search's trials only.
    parent = start_or_resume_run(base, name, tags={ROLE_TAG: "search", SEARCH_TAG: name},
                                 resume=resume)
    logger = RunLogger(base.run.tracking_uri, parent)
    logger.text(to_yaml(base), "base_config.yaml")
    import yaml

    logger.text(yaml.safe_dump(space.to_dict(), sort_keys=False), "search_space.yaml")
    client = mlflow_client(base.run.tracking_uri)
    for key, value in (("search.scheduler", space.scheduler), ("search.algorithm", space.search),
                       ("search.metric", space.metric),
                       ("search.rank_by", space.ranking_metric), ("search.num_trials",
                                                          space.num_trials())):
        client.set_tag(parent, key, str(value))
    return parent


def _close_stopped_children(uri: str, parent_run_id: str, experiment: str,
                            not_errored: set[str]) -> None:
    """Trials stopped by the scheduler: mark their runs KILLED. Such a trial may die before
    its run is ended (RUNNING), or its fit may see the stop as a failure first (FAILED);
    Tune itself records no error for it (`not_errored`: those trial ids)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for run in children:
        stopped = run.info.status == "FAILED" and \
            run.data.tags.get("micl.trial_id") in not_errored
        if run.info.status == "RUNNING" or stopped:
            client.set_terminated(run.info.run_id, "KILLED")


def _new_tuner(trainable: Any, base: Config, space: SearchSpace, name: str,
               concurrency: int) -> tune.Tuner:
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=space.num_samples,
            scheduler=_scheduler(space, base),
            # the search algorithm carries the concurrency limit: TuneConfig's own would be
            # ignored, with a warning on the user's console
            search_alg=_search_alg(space, concurrency, base.run.seed),
            # A trial that asks for the same resources as one that ended takes over its
            # process, with torch and timm already imported (a one-worker trial trains
            # there): seconds of CPU per trial after the first when trials queue.
            reuse_actors=True),
        # A trial that trains in its own process is retried by Tune, as Ray Train would retry
        # its worker group; it resumes from its last checkpoint on storage.
        run_config=tune.RunConfig(name=name, storage_path=base.run.storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(
                                      max_failures=base.run.max_failures
                                      if trains_alone(base) else 0)),
    )


def run_search(base: Config, space: SearchSpace, name: str | None = None) -> SearchResult:
    """Run (or resume, when `name` names an interrupted search) a Tune search over `space`."""
    import time

    # Check and resolve the defaults here: trials run in their own directories, where a
    # relative ./mlflow.db or ./runs would point somewhere else.
    base = resolve(check(from_dict(base.to_dict()), preflight=True))
    connect_ray()
    name = name or f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    uri, root = base.run.tracking_uri, base.run.storage_path
    path = f"{root.rstrip('/')}/{name}"
    restoring = tune.Tuner.can_restore(path)
    parent = _parent_run(base, name, space, resume=restoring)
    trainable = tune.with_resources(
        make_trainable(base, name, parent),
        lambda params: trial_resources(apply_trial_params(base, params)))
    concurrency = concurrent_trials(base, space)
    if restoring:
        print(f"[micl] resuming search {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, base, space, name, concurrency)
    results = tuner.fit()
    _close_stopped_children(uri, parent, base.run.experiment,
                            {(r.metrics or {}).get("trial_id") for r in results if not r.error})

    ranking = space.ranking_metric
    probes = _probe_finished_trials(base, parent, name) if space.rank_by else {}
    trials = []
    for r in results:
        metrics = {**(r.metrics or {}), **probes.get((r.metrics or {}).get("trial_id"), {})}
        trials.append({"params": {k: v for k, v in (r.config or {}).items()},
                       space.metric: metrics.get(space.metric), ranking: metrics.get(ranking),
                       "epochs": metrics.get("epoch"), "error": str(r.error) if r.error else None})
    scored = [t for t in trials if _finite(t[ranking])]
    best = (max if space.mode == "max" else min)(scored, key=lambda t: t[ranking], default=None)
    client = mlflow_client(uri)
    if best is not None:
        client.log_metric(parent, f"best_{ranking}", best[ranking])
        client.set_tag(parent, "search.best_params", str(best["params"]))
    client.set_terminated(parent, "FINISHED" if best is not None else "FAILED")
    return SearchResult(name=name, parent_run_id=parent, tracking_uri=uri,
                        best_params=best["params"] if best else {},
                        best_metric=best[ranking] if best else None,
                        trials=trials, path=str(Path(path)) if "://" not in path else path)


def _probe_finished_trials(base: Config, parent_run_id: str, search_name: str
                           ) -> dict[str, dict[str, float]]:
    """trial id -> the end-of-trial linear probe (`rank_by: linear_top1`) of each trial that
    trained every epoch, from its last checkpoint on storage, logged to the trial's run. Run
    here, after the search: a trial's own process may be torn down by the scheduler."""
    client = mlflow_client(base.run.tracking_uri)
    exp = client.get_experiment_by_name(base.run.experiment)
    probes = {}
    for run in client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        trial_id = run.data.tags.get("micl.trial_id")
        if run.data.metrics.get("epoch") != base.optim.epochs or trial_id is None:
            continue
        ckpt = latest_checkpoint_on_storage(
            f"{base.run.storage_path.rstrip('/')}/{search_name}-{trial_id}")
        if ckpt is None:
            continue
        with ckpt.as_directory() as d:
            probes[trial_id] = evaluate_run(checkpoint=d, protocols=("linear",),
                                            tracking_uri=base.run.tracking_uri).metrics
    return probes


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
