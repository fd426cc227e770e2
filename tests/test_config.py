from pathlib import Path

import pytest

from micl.artifacts import export_encoder
from micl.config import Config, ConfigError, ModelConfig, load_config, parse_override
from micl.driver import check
from micl.models import MaskedViT
from micl.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_flatten():
    cfg = load_config()
    assert cfg.flat()["method.name"] == "micl"
    # The method's own fields (and their defaults) are filled in by the method's check.
    flat = check(cfg).flat()
    assert flat["method.mask_ratio"] == 0.9
    assert flat["method.temperature"] == 0.07
    assert flat["model.name"] == "vit_tiny"
    assert cfg.method.args["mask_ratio"] == 0.9  # check records them in cfg itself


def test_yaml_then_cli_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  depth: 6\nmethod:\n  mask_ratio: 0.75\n")
    cfg = load_config(p, ["method.mask_ratio=0.5", "optim.blr=1e-4", "run.name=abc"])
    assert cfg.model.depth == 6
    assert cfg.method.args["mask_ratio"] == 0.5  # the raw value, as given
    assert OBJECTIVES["micl"].parse_args(cfg).mask_ratio == 0.5  # typed by the method
    assert check(cfg).method.args["mask_ratio"] == 0.5
    assert cfg.flat()["method.mask_ratio"] == 0.5
    assert cfg.optim.blr == 1e-4
    assert cfg.run.name == "abc"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.mask_ratio=1.5", "method.mask_ratio"),
        ("method.mask_ratio=0", "method.mask_ratio"),
        ("method.mask_ratio=0.99", "method.mask_ratio"),  # 49 patches: no patch left per view
        ("method.temperature=0", "method.temperature"),
        ("method.temperature=-0.1", "method.temperature"),
        ("model.img_size=30", "model.img_size"),
        ("method.name=simclr", "method.name"),
        ("model.name=vit_gigantic", "model.name"),
        ("model.depht=3", "model.depht"),
        ("method.temperature=hot", "method.temperature"),
        ("data.source=mnist", "data.source"),
        ("method.negatives=everywhere", "method.negatives"),
        ("run.gpus_per_worker=0", "run.gpus_per_worker"),
        ("run.gpus_per_worker=1.5", "run.gpus_per_worker"),  # a fraction of one, or whole GPUs
        ("data.node_labels={micl-role: 1}", "data.node_labels.micl-role"),
        ("data.node_labels=data", "data.node_labels"),
        ("run.worker_resources={trainer: 0}", "run.worker_resources.trainer"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    # The generic fields fail in load_config, data.source and method.* in the driver's check.
    with pytest.raises(ConfigError) as info:
        check(load_config(overrides=[override]))
    assert field in str(info.value)


@pytest.mark.parametrize("override", ["method.mask_ratio=1.5", "method.name=simclr",
                                      "data.source=mnist", "method.mask_ration=0.5"])
def test_registry_fields_are_checked_by_the_driver_not_by_load_config(override):
    cfg = load_config(overrides=[override])  # generic validation only: passes
    with pytest.raises(ConfigError):
        check(cfg)


def test_a_field_of_another_method_is_named_with_the_method():
    # The demo config sets MiCL-only fields (temperature, kappa); MAE has no temperature.
    cfg = load_config(ROOT / "configs/fashion_mnist_quality.yaml", ["method.name=mae"])
    with pytest.raises(ConfigError, match=r"unknown field.*\(the fields of method.name = mae\)"):
        check(cfg)


@pytest.mark.parametrize(("name", "path"), [
    ("micl", "configs/fashion_mnist_quality.yaml"), ("mae", "configs/fashion_mnist_mae.yaml"),
    ("macrl", "configs/fashion_mnist_macrl.yaml"), ("mimco", "configs/fashion_mnist_mimco.yaml")])
def test_shipped_method_configs_check(name, path, tmp_path):
    overrides = []
    if name == "mimco":  # the teacher is named on the command line: a small exported encoder
        m = ModelConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1,
                        num_heads=2)
        weights = export_encoder(MaskedViT.from_config(m), m, tmp_path)
        overrides = [f"method.teacher_checkpoint={weights}"]
    cfg = check(load_config(ROOT / path, overrides), preflight=True)
    assert cfg.method.name == name
    assert set(cfg.method.args) == set(OBJECTIVES[name].Args.__dataclass_fields__)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_section_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle:\n  depth: 6\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(p)


def test_imagefolder_requires_path():
    with pytest.raises(ConfigError, match="data.path"):
        check(load_config(overrides=["data.source=imagefolder"]))


def test_config_is_a_dataclass_tree():
    cfg = Config()
    assert cfg.model.num_patches == 49
    assert cfg.model.dims() == (192, 12, 3)
