"""Where MLflow is, and what tracking failures do (no Ray; one test runs a real `mlflow server`)."""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import pytest
from helpers import LoopbackGate
from mlflow.tracking import MlflowClient
from test_cluster import free_ports
from test_multinode import mlflow_server

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
    assert len(logger.pending) == 3  # kept for when the store answers again
    assert any("note.txt" in what for what in logger.lost)


def test_ending_a_run_keeps_the_status_something_else_gave_it(tmp_path):
    """A Tune search marks a stopped trial's run KILLED after the search; the trial's own fit,
    dying later, ends its run FAILED. The later end must not overwrite KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    stopped = client.create_run(client.create_experiment("e")).info.run_id
    client.set_terminated(stopped, "KILLED")  # what the search does
    RunLogger(uri, stopped).end("FAILED")  # what the dying trial does afterwards
    assert client.get_run(stopped).info.status == "KILLED"
    running = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    RunLogger(uri, running).end("FAILED")
    assert client.get_run(running).info.status == "FAILED"


@pytest.mark.e2e
def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path):
    """A real `mlflow server` becomes unreachable mid-run and comes back on the same address:
    training is told once when it goes and once when it is back, and no metric value is lost.
    The first tags call after the return gets through although the metrics' retry is not yet
    due: tags, artifacts and models are always tried (the encoder at a run's end must not
    wait). The server stays up behind a loopback gate that cuts it off (one start instead of
    two); tests/test_multinode.py stops and restarts the server process itself."""
    port = free_ports(1)[0]
    gate = LoopbackGate(port)
    with mlflow_server(tmp_path, tmp_path / "artifacts", port) as server:
        # Run as cluster.yaml's head runs it: MLflow's job runner (huey consumers, already
        # up when /health answers) is off, since it costs 0.2 of a core while idle.
        assert not [c for c in server.commands() if "huey" in c or "jobs._job_runner" in c], \
            server.commands()
        gate.open()
        url = f"http://127.0.0.1:{gate.port}"
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = RunLogger(url, run_id, retry_s=600)
        logger.metrics({"loss": 4.0}, step=1)
        gate.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger.metrics({"loss": 3.0}, step=2)  # the server is out of reach
            logger.metrics({"loss": 2.0}, step=3)
            logger.tags({"note": "during the outage"})
            gate.open()
            logger.tags({"note": "back"})  # any call that gets through sends the kept values
            history = MlflowClient(url).get_metric_history(run_id, "loss")
            logger.metrics({"loss": 1.0}, step=4)
            history += MlflowClient(url).get_metric_history(run_id, "loss")[3:]
        gate.close()
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert len(messages) == 2, messages
    assert "Training continues" in messages[0]
    assert "answers again" in messages[1] and "2 metric values" in messages[1] \
        and "tags" in messages[1]
    assert [(m.step, m.value) for m in history] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    assert not logger.pending


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
