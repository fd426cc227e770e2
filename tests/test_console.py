"""What a user sees: the console of a real run (one line each, progress, no Ray internals, a
data error in a worker as one line) and the run as MLflow 3 shows it (training view, source,
dataset input, per-step and system metrics, the encoder as a logged model).

The demo test runs `pipelines/pretrain.py` as the user does, in a process of its own with its
own Ray (stdout a pipe, as under `ray job submit` or in CI); the data-error test calls the same
`main()` in this process, on the session's Ray, to spare a second Ray start."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from helpers import make_image_folder
from mlflow import MlflowClient
from test_objectives import MODEL

from micl.artifacts import load_encoder
from micl.console import (
    Console,
    Progress,
    ProgressView,
    format_duration,
    progress_line,
)
from micl.data.clock import epoch_clock, new_clock_name
from micl.tracking import use_tracking_uri
from pipelines.pretrain import main as pretrain_cli

ROOT = Path(__file__).resolve().parents[1]

# What Ray, Ray Train, Ray Data, MLflow and matplotlib print when nobody stops them.
INTERNALS = ["RayTrainWorker", "TrainController", "core_worker", "Progress bars disabled",
             "available CPUs", "TrainingReport", "Warning", "fontManager", " INFO ",
             "Setting up process group", "Checkpoint successfully", "Execution plan",
             "SplitCoordinator", "Traceback"]


# ----------------------------------------------------------------------------- pure parts


def test_progress_line_says_where_the_phase_stands():
    p = Progress("epoch 2/6", 110, 235, "steps", 22.0, loss=4.2104, images_per_s=598.4)
    assert progress_line(p) == ("[micl] epoch 2/6   46% 110/235 steps  loss 4.21  598 img/s  "
                                "25s left")
    # 20 s of it went by before the first step (the stream's start): not extrapolated
    ramped = Progress("epoch 2/6", 110, 235, "steps", 22.0, ramp_s=20.0)
    assert progress_line(ramped).endswith("  2s left")
    assert progress_line(Progress("kNN bank", 2048, None, "images", 1.0)) == \
        "[micl] kNN bank  2048 images"
    assert [format_duration(s) for s in (59.4, 61, 3725)] == ["59s", "1m01s", "1h02m"]


def test_log_view_prints_a_line_every_few_seconds_and_none_for_a_finished_phase():
    out = io.StringIO()
    view = ProgressView(out, tty=False, every_s=1.5)
    view.progress(Progress("epoch 1/2", 1, 4, "steps", 1.0))  # not 1.5 s into the phase yet
    view.progress(Progress("epoch 1/2", 2, 4, "steps", 2.0))
    view.line("[micl] something happened")
    view.progress(Progress("epoch 1/2", 4, 4, "steps", 4.0))  # over: the summary line follows
    slow = ProgressView(out, tty=False, every_s=3600)
    slow.progress(Progress("epoch 2/2", 1, 4, "steps", 1.0))
    slow.progress(Progress("epoch 2/2", 3, 4, "steps", 3.0))  # not yet due
    assert out.getvalue().splitlines() == [
        "[micl] epoch 1/2   50% 2/4 steps  2s left", "[micl] something happened"]


def test_terminal_view_draws_a_bar_that_ends_with_its_phase():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    for done in (1, 3):
        view.progress(Progress("epoch 1/2", done, 4, "steps", done, loss=2.5, images_per_s=100))
    view.line("[micl] a warning while the bar runs")
    view.progress(Progress("epoch 1/2", 4, 4, "steps", 4.0, loss=2.0, images_per_s=100))
    view.progress(Progress("epoch 1/2", 4, 4, "steps", 4.0))  # a late repeat draws nothing
    view.close()
    text = out.getvalue()
    assert "[micl] epoch 1/2" in text and "4/4" in text and "loss=2" in text
    assert text.count("[micl] a warning while the bar runs") == 1
    assert view._bar is None


def test_console_throttles_and_tracks_items():
    seen: list[tuple[str, object]] = []
    console = Console(lambda kind, payload: seen.append((kind, payload)), every_s=0.0)
    items = list(console.track(iter([[0] * 3, [0] * 5]), "pass", size=len))
    assert items == [[0] * 3, [0] * 5]
    assert [p.done for kind, p in seen] == [3, 8] and seen[-1][1].unit == "images"
    lazy = Console(lambda kind, payload: None, every_s=3600)
    assert lazy.due() and not lazy.due()


def test_relay_keeps_lines_in_order_and_only_the_newest_progress(ray_local):
    """A fit's epoch clock relays its console (micl.console.watch): lines in order, only the
    newest progress report between two lines, each event taken once."""
    relay = epoch_clock(new_clock_name("test-relay"))
    for call in (relay.line.remote("a"), relay.progress.remote(Progress("e", 1, 9, "steps", 1)),
                 relay.progress.remote(Progress("e", 2, 9, "steps", 2)), relay.line.remote("b"),
                 relay.progress.remote(Progress("e", 3, 9, "steps", 3))):
        ray.get(call)
    events = ray.get(relay.take.remote())
    assert [(k, p if k == "line" else p.done) for k, p in events] == \
        [("line", "a"), ("progress", 2), ("line", "b"), ("progress", 3)]
    assert ray.get(relay.take.remote()) == []
    relay.close()


# ----------------------------------------------------------------------------- end to end


def cli_args(tmp_path: Path, *overrides: str) -> list[str]:
    """pipelines/pretrain.py's arguments for tiny synthetic data and one Ray Train worker."""
    args = ["data.source=synthetic", "data.synthetic_size=640", "data.batch_size=16",
            "data.map_batch_size=64", "data.knn_bank_size=64", "data.knn_query_size=32",
            "data.data_cpus=0.5",
            # 8 batches to a mixing window, as Fashion-MNIST's 2048 rows are 8 of 256: with
            # the default window all 640 rows are buffered before step 1, the 40 steps then
            # take under a second, and a progress line is down to the 0.5 s poll's timing.
            "data.shuffle_buffer=128", *MODEL, "method.mask_ratio=0.5", "optim.epochs=2",
            "optim.warmup_epochs=0", "optim.blr=0.02",
            "run.num_workers=1", "run.cpus_per_worker=0.5", "run.torch_threads=1",
            "run.progress_every_s=0.2", "run.log_every_steps=5",
            "run.system_metrics_every_s=0.5", "run.name=demo", "run.register_model=demo-encoder",
            f"run.storage_path={tmp_path / 'runs'}",
            f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    return [a for o in args for a in ("--set", o)]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """pipelines/pretrain.py as a user runs it: its own process and Ray, output to a pipe."""
    command = [sys.executable, str(ROOT / "pipelines" / "pretrain.py"),
               *cli_args(tmp_path, *overrides)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}  # Ray's default
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.e2e
def test_demo_console_and_mlflow_run(tmp_path):
    proc = run_cli(tmp_path)
    lines = console_lines(proc)
    assert proc.returncode == 0, "\n".join(lines)
    assert len(lines) == len(set(lines)), "a line printed twice:\n" + "\n".join(lines)
    assert not [line for line in lines if any(s in line for s in INTERNALS)], "\n".join(lines)
    line_format = r"\[micl\] epoch \d/2 +\d+% \d+/40 steps  loss \S+  \d+ img/s  (\d+m)?\d+s left$"
    progress = [line for line in lines if re.match(line_format, line)]
    assert progress, "no progress line:\n" + "\n".join(lines)
    assert [line.split(":")[0] for line in lines if re.match(r"\[micl\] epoch \d/2:", line)] == \
        ["[micl] epoch 1/2", "[micl] epoch 2/2"]
    [checkpoint] = [line.split()[-1] for line in lines if line.startswith("checkpoint ")]
    check_native_mlflow_run(tmp_path, checkpoint)


def check_native_mlflow_run(tmp_path: Path, checkpoint: str) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("micl-pretrain")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([exp.experiment_id])[0]
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pretrain.py"
    if (ROOT / ".git").exists():  # a checkout (CI's fresh clone is one): its commit is recorded
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert "micl pre-training of vit_tiny" in tags["mlflow.note.content"]
    assert float(tags["micl.knn_top1_init"]) > 0 and "knn_top1_init" not in run.data.metrics
    assert run.data.params["optim.epochs"] == "2"
    [data] = run.inputs.dataset_inputs
    assert data.dataset.name == "synthetic/train" and '"num_rows": 640' in data.dataset.profile
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/loss")]
    assert steps == list(range(5, 81, 5))  # 40 steps per epoch, every 5th
    assert {"step/lr", "step/images_per_s", "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    [output] = run.outputs.model_outputs
    assert output.step == 2  # logged after the last epoch, whose metrics it carries
    model = client.get_logged_model(output.model_id)
    assert model.experiment_id == run.info.experiment_id  # listed in its experiment's Models
    assert {m.key for m in model.metrics} >= {"loss", "knn_top1"}
    [version] = client.search_model_versions("name = 'demo-encoder'")
    assert version.run_id == run.info.run_id and output.model_id in version.source
    import mlflow.pytorch

    with use_tracking_uri(client.tracking_uri):
        logged = mlflow.pytorch.load_model(f"models:/{output.model_id}").eval()
    from_checkpoint = load_encoder(checkpoint=checkpoint).encoder.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(logged(x), from_checkpoint(x), atol=1e-6)


@pytest.mark.e2e
def test_a_data_error_in_a_worker_is_one_line_naming_the_files(ray_local, tmp_path, capfd):
    """The same entry point in this process, on the session's Ray (which, like the one
    pipelines/pretrain.py starts, keeps the workers' own output off the console): the error
    is found by a Ray Data task and raised in the Ray Train worker."""
    info = make_image_folder(tmp_path / "data", n_per_class=12, size=20, split="train")
    make_image_folder(tmp_path / "data", n_per_class=4, size=20, split="val", bad_files=False)
    code = pretrain_cli(cli_args(tmp_path, "data.source=imagefolder", f"data.path={info['root']}",
                                 "data.max_bad_fraction=0.01", "optim.epochs=1"))
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert code == 1, "\n".join(lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "data.max_bad_fraction" in errors[0], "\n".join(lines)
    assert any(Path(bad).name in errors[0] for bad in info["bad"])
    assert not [line for line in lines if any(s in line for s in INTERNALS)], "\n".join(lines)
