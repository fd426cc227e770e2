"""Where MLflow is, and what tracking failures do: plain unit tests (no Ray)."""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

from micl.config import load_config
from micl.driver import check
from micl.tracking import RunLogger, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def test_tracking_store_order_config_then_environment_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(load_config()) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(load_config()) == "http://127.0.0.1:5999"
    cfg = load_config(overrides=["run.tracking_uri=sqlite:///rel/m.db"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"  # made absolute


def test_a_store_failing_mid_run_is_warned_about_once(tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logger = RunLogger(f"http://127.0.0.1:{port}", "0" * 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):  # the loop keeps calling; nothing raises
            logger.metrics({"loss": 1.0}, step=step)
        logger.text("x", "note.txt")
        logger.end()
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert len(messages) == 1 and "Training continues" in messages[0]
    assert logger.failed


def test_the_demo_config_is_the_documented_recipe():
    """configs/fashion_mnist_quality.yaml's header promises patch 7, r = 0.25, T = 0.025 and 6
    epochs (README "The demo"); the file must say the same."""
    path = ROOT / "configs" / "fashion_mnist_quality.yaml"
    cfg = check(load_config(path))
    header = path.read_text().split("\nmodel:")[0]
    assert (cfg.model.img_size, cfg.model.patch_size) == (28, 7) and "patch 7" in header
    assert (cfg.method.name, cfg.method.args["mask_ratio"], cfg.method.args["temperature"]) \
        == ("micl", 0.25, 0.025)
    assert "r = 0.25" in header and "T = 0.025" in header
    assert cfg.optim.epochs == 6 and re.search(r"\b6 epochs\b", header)
