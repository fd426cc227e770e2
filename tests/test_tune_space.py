"""Search spaces: the shipped YAML files load, malformed spaces fail before Ray starts with a
message naming the field, and the Tune param space has the expected trials."""

import importlib.util
import re
from pathlib import Path

import pytest

from micl.config import Config, ConfigError, load_config
from micl.driver import check
from micl.tune import concurrent_trials, trial_resources
from micl.tune_space import SearchSpace, apply_trial_params, load_space, parse_space
from pipelines.tune import DEFAULT_CONFIG as TUNE_DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parents[1]
GRID = {"method.mask_ratio": {"grid": [0.75, 0.9]}, "method.temperature": {"grid": [0.05, 0.1]}}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_grid_space_loads_with_defaults():
    space = load_space(ROOT / "tune_spaces/mask_ratio_temperature.yaml")
    assert set(space.params) == {"method.mask_ratio", "method.temperature"}
    assert space.metric == "knn_top1" and space.mode == "max"
    assert space.scheduler == "asha" and space.search == "random"
    assert space.num_trials() == 9
    assert space.to_dict()["num_trials"] == 9


def test_shipped_random_space_loads():
    space = load_space(ROOT / "tune_spaces/mask_ratio_temperature_lr_kappa.yaml")
    assert {"optim.blr", "method.kappa"} <= set(space.params)
    assert next(iter(space.params["optim.blr"])) == "loguniform"
    assert space.search == "random"
    assert space.num_trials() == space.num_samples > 1


def test_to_tune_gives_every_grid_point():
    from ray.tune.search.variant_generator import generate_variants

    space = parse_space({"params": GRID, "num_samples": 3})
    param_space = space.to_tune()
    assert param_space["method.mask_ratio"] == {"grid_search": [0.75, 0.9]}
    variants = [cfg for _, cfg in generate_variants(param_space)]
    assert len(variants) == 4  # Tune expands one grid per sample
    assert {(v["method.mask_ratio"], v["method.temperature"]) for v in variants} == {
        (0.75, 0.05), (0.75, 0.1), (0.9, 0.05), (0.9, 0.1)}
    assert space.num_trials() == 4 * 3


def test_to_tune_samplers_stay_in_range():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_space({"params": {
        "optim.blr": {"loguniform": ["1e-5", 1.0e-3]},  # YAML 1.1 text form is accepted
        "method.kappa": {"choice": [0, 0.25]},
        "method.mask_ratio": {"uniform": [0.5, 0.9]},
        "run.seed": {"randint": [2, 5]},
    }, "num_samples": 5})
    ps = space.to_tune()
    assert isinstance(ps["optim.blr"], Float) and isinstance(ps["method.kappa"], Categorical)
    assert isinstance(ps["run.seed"], Integer)
    assert space.params["optim.blr"] == {"loguniform": [1e-5, 1e-3]}
    assert space.params["method.kappa"] == {"choice": [0.0, 0.25]}  # stored as the config's float
    for _ in range(20):
        assert 1e-5 <= ps["optim.blr"].sample() <= 1e-3
        assert 0.5 <= ps["method.mask_ratio"].sample() <= 0.9
        assert 2 <= ps["run.seed"].sample() < 5
    assert space.num_trials() == 5


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("params:\n  method.mask_ratoi: {grid: [0.5]}\n",
         ["params.method.mask_ratoi", "unknown config field", "method.mask_ratio"]),
        ("params:\n  method: {grid: [0.5]}\n", ["params.method", "dotted"]),
        ("params:\n  optim.blr: {uniform: [1.0e-3, 1.0e-4]}\n", ["params.optim.blr", "< high"]),
        ("params:\n  optim.blr: {loguniform: [0.0, 1.0e-4]}\n", ["params.optim.blr", "> 0"]),
        ("params:\n  method.kappa: {choice: []}\n", ["params.method.kappa", "non-empty"]),
        ("params:\n  method.mask_ratio: {grid: [0.5, 1.5]}\n",
         ["params.method.mask_ratio", "1.5", "must be in (0, 1)"]),
        ("params:\n  method.mask_ratio: {uniform: [0.5, 0.99]}\n",
         ["params.method.mask_ratio", "high 0.99", "patches per view"]),
        ("params:\n  method.temperature: {grid: [hot]}\n", ["params.method.temperature", "hot"]),
        ("params:\n  method.temperature: {normal: [0.1, 0.2]}\n",
         ["params.method.temperature", "unknown spec kind", "normal"]),
        ("params:\n  method.temperature: [0.1, 0.2]\n", ["params.method.temperature", "grid"]),
        ("params:\n  optim.epochs: {uniform: [2, 5]}\n", ["params.optim.epochs", "expected a int"]),
        ("params: {}\n", ["params", "non-empty"]),
        (f"params: {GRID}\nmetric: loss\n", ["metric", "loss", "not comparable", "temperature"]),
        (f"params: {GRID}\nscheduler: hyperband\n", ["scheduler", "hyperband", "asha"]),
        (f"params: {GRID}\nsearch: bayes\n", ["search", "bayes", "optuna"]),
        (f"params: {GRID}\nsearch: optuna\n", ["search", "optuna", "grid"]),
        (f"params: {GRID}\nmode: best\n", ["mode", "best"]),
        (f"params: {GRID}\nrank_by: finetune_top1\n",
         ["rank_by", "finetune_top1", "linear_top1"]),
        (f"params: {GRID}\nnum_samples: 0\n", ["num_samples", ">= 1"]),
        (f"params: {GRID}\nnum_sample: 2\n", ["num_sample", "unknown key", "num_samples"]),
        ("- method.mask_ratio\n", ["mapping"]),
        ("params: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_malformed_space_names_the_problem(tmp_path, text, needles):
    with pytest.raises(ConfigError) as info:
        load_space(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message.strip() or "YAML" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_values_are_checked_against_the_base_config():
    # 0.95 leaves 1 patch per view of 49 (28 px, patch 4) but none of 25 (20 px, patch 4).
    text = {"params": {"method.mask_ratio": {"grid": [0.75, 0.95]}}}
    assert parse_space(text).num_trials() == 2
    small = load_config(flat_overrides={"model.img_size": 20})
    with pytest.raises(ConfigError, match="grid value 0.95 .* 25 patches"):
        parse_space(text, base=small)


def test_trials_need_at_least_one_worker():
    """Ray Train's local mode (run.num_workers = 0) cannot run inside a Tune trial."""
    text = {"params": {"method.mask_ratio": {"grid": [0.75, 0.9]}}}
    with pytest.raises(ConfigError, match="run.num_workers: trials need at least 1 worker"):
        parse_space(text, base=load_config(flat_overrides={"run.num_workers": 0}))
    workers = {"params": {"run.num_workers": {"grid": [0, 1]}}}
    with pytest.raises(ConfigError, match="run.num_workers: trials need"):
        parse_space(workers)


def documented_command(path: Path) -> tuple[str, list[str]]:
    """(--config, --set values) of the `Run:` command in a space file's header."""
    header = path.read_text().split("# Compare:")[0]
    configs = [c for c in re.findall(r"--config (\S+)", header) if "<" not in c]
    return (configs[0] if configs else str(TUNE_DEFAULT_CONFIG),
            re.findall(r"--set (\S+)", header))


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_space_loads_as_its_header_says_to_run_it(path):
    """What `pipelines/tune.py` checks before Ray starts, for the command each file documents."""
    config, overrides = documented_command(path)
    assert "--space tune_spaces/" + path.name in path.read_text()
    space = load_space(path, base=check(load_config(ROOT / config, overrides)))
    assert space.num_trials() >= 1 and space.params


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna installed")
def test_optuna_without_its_package_is_a_clear_error():
    text = {"params": {"method.temperature": {"loguniform": [0.01, 0.1]}}, "search": "optuna"}
    with pytest.raises(ConfigError, match=r"search: optuna needs the optuna package: pip"):
        parse_space(text)


def test_apply_trial_params_returns_a_validated_copy():
    unchecked = load_config(flat_overrides={"optim.epochs": 3, "optim.warmup_epochs": 1})
    base = check(load_config(flat_overrides={"optim.epochs": 3, "optim.warmup_epochs": 1}))
    for start in (unchecked, base):
        cfg = apply_trial_params(start, {"method.mask_ratio": 0.75, "method.temperature": 0.1,
                                         "optim.blr": "1e-4"})
        args = cfg.method.args  # checked: every MiCL field, typed
        assert (args["mask_ratio"], args["temperature"], cfg.optim.blr) == (0.75, 0.1, 1e-4)
        assert args["kappa"] == 1 / 64 and args["negatives"] == "local"
        assert cfg.optim.epochs == 3  # the base's other values are kept
    assert base.method.args["mask_ratio"] == 0.9  # the base is not changed
    assert unchecked.method.args == {}  # (not even filled in)
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        apply_trial_params(base, {"method.mask_ratio": 1.5})
    with pytest.raises(ConfigError, match="method.temprature"):
        apply_trial_params(base, {"method.temprature": 0.1})


def test_apply_trial_params_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    cfg = apply_trial_params(Config(), {"method.kappa": np.float64(0.25),
                                        "optim.epochs": np.int64(20)})
    assert cfg.method.args["kappa"] == 0.25 and cfg.optim.epochs == 20
    assert type(cfg.method.args["kappa"]) is float
    assert type(cfg.optim.epochs) is int


def test_method_fields_are_the_base_methods():
    # A space searches the fields of the base config's method: MAE has a decoder, no kappa.
    mae = load_config(ROOT / "configs/fashion_mnist_mae.yaml")
    space = parse_space({"params": {"method.decoder_depth": {"grid": [1, 2]},
                                    "method.mask_ratio": {"uniform": [0.5, 0.9]}}}, base=mae)
    assert space.num_trials() == 2
    with pytest.raises(ConfigError, match="params.method.kappa.*unknown config field"):
        parse_space({"params": {"method.kappa": {"grid": [0.0, 0.25]}}}, base=mae)
    with pytest.raises(ConfigError, match="params.method.decoder_depth"):
        parse_space({"params": {"method.decoder_depth": {"grid": [1, 2]}}})  # MiCL base
    macrl = check(load_config(ROOT / "configs/fashion_mnist_macrl.yaml"))
    with pytest.raises(ConfigError, match="grid value 0.95 .*method.strong_mask_ratio"):
        parse_space({"params": {"method.mask_ratio": {"grid": [0.5, 0.95]}}}, base=macrl)


def test_space_round_trips_through_to_dict():
    space = parse_space({"params": GRID, "scheduler": "fifo", "max_concurrent_trials": 2})
    d = space.to_dict()
    assert d["params"] == GRID and d["scheduler"] == "fifo" and d["max_concurrent_trials"] == 2
    again = parse_space({k: v for k, v in d.items() if k != "num_trials"})
    assert again == space
    assert isinstance(again, SearchSpace)
    assert "4 trials" in space.summary()


@pytest.mark.parametrize(("gpus_per_worker", "workers", "expected"),
                         [(1.0, 1, 1), (0.5, 1, 2), (0.25, 2, 2), (0.5, 2, 1)])
def test_fractional_gpus_let_trials_share_a_gpu(gpus_per_worker, workers, expected):
    cfg = load_config(overrides=["run.use_gpu=true", f"run.gpus_per_worker={gpus_per_worker}",
                                 f"run.num_workers={workers}"])
    space = parse_space({"params": {"method.mask_ratio": {"grid": [0.5, 0.6, 0.75, 0.9]}}}, cfg)
    # 16 CPUs would fit 8 trials; the one GPU decides.
    assert concurrent_trials(cfg, space, {"CPU": 16, "GPU": 1}) == expected


@pytest.mark.parametrize(("workers", "trainer_nodes", "expected"), [(1, 2, 2), (2, 2, 1),
                                                                      (1, 1, 1), (1, 8, 4)])
def test_trials_fit_the_workers_custom_resources(workers, trainer_nodes, expected):
    """The simulated cluster's trainer nodes (tests/test_multinode.py): each worker needs one
    `trainer`; 16 CPUs alone would fit 8 trials, the 4 grid points at most 4."""
    cfg = load_config(overrides=[f"run.num_workers={workers}", "run.cpus_per_worker=0.5",
                                 "run.worker_resources={trainer: 1}"])
    space = parse_space({"params": {"method.mask_ratio": {"grid": [0.5, 0.6, 0.75, 0.9]}}}, cfg)
    assert concurrent_trials(cfg, space, {"CPU": 16, "trainer": trainer_nodes}) == expected


def test_a_one_worker_trial_holds_the_workers_resources():
    """A one-worker trial trains in its own process, so that process asks for what the
    worker would (Tune places it by them: a GPU share, a trainer node); a trial with more
    workers leaves them to its TorchTrainer's workers."""
    gpu = ["run.use_gpu=true", "run.gpus_per_worker=0.5", "run.cpus_per_worker=2",
           "run.worker_resources={trainer: 1}"]
    one = load_config(overrides=gpu)
    assert trial_resources(one).bundles == [{"CPU": 2.0, "trainer": 1.0, "GPU": 0.5}]
    two = load_config(overrides=[*gpu, "run.num_workers=2"])
    assert trial_resources(two).bundles == [{"memory": 64 * 2**20}]
