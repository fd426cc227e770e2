import pytest

from micl.config import Config, ConfigError, load_config, parse_override


def test_defaults_validate_and_flatten():
    cfg = load_config()
    flat = cfg.flat()
    assert flat["method.mask_ratio"] == 0.9
    assert flat["method.temperature"] == 0.07
    assert flat["model.name"] == "vit_tiny"


def test_yaml_then_cli_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  depth: 6\nmethod:\n  mask_ratio: 0.75\n")
    cfg = load_config(p, ["method.mask_ratio=0.5", "optim.blr=1e-4", "run.name=abc"])
    assert cfg.model.depth == 6
    assert cfg.method.mask_ratio == 0.5
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
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert field in str(info.value)


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
        load_config(overrides=["data.source=imagefolder"])


def test_config_is_a_dataclass_tree():
    cfg = Config()
    assert cfg.model.num_patches == 49
    assert cfg.model.dims() == (192, 12, 3)
