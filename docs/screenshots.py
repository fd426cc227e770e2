"""Screenshots of the MLflow UI showing micl's runs as a user sees them (docs/figures/mlflow_*.png).

    python pipelines/pretrain.py                                  # a demo run
    python pipelines/tune.py --space tune_spaces/quick_grid.yaml ... --name quick-grid
    python docs/screenshots.py --tracking-uri sqlite:///mlflow.db --out docs/figures

It starts `mlflow server` on a free loopback port against that store, opens five pages in
headless Chromium (Debian's `chromium` package; this script installs nothing), writes one PNG
per page, and stops the server it started:

    mlflow_experiment.png     the experiment: runs, datasets, the search's parent row
    mlflow_run_metrics.png    the newest training run's metric charts (per epoch and per step)
    mlflow_search.png         the newest search: its trials' kNN curves side by side
    mlflow_artifacts.png      the training run's artifacts, the masked-views picture open
    mlflow_logged_model.png   the encoder as a logged model with the metrics it was saved at
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.tracking import ROLE_TAG, SERVER_ENV, mlflow_client  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tracking_uri: str, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri",
         tracking_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **SERVER_ENV})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"mlflow server exited with code {server.returncode}") from None
            time.sleep(1)
    server.terminate()
    raise SystemExit("mlflow server did not answer within 120 s")


def screenshot(chromium: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def pages(tracking_uri: str, experiment: str) -> dict[str, str]:
    """Page name -> URL path of the newest training run, search and logged model."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    train = next((r for r in runs if r.data.tags.get(ROLE_TAG) == "train"), None)
    search = next((r for r in runs if r.data.tags.get(ROLE_TAG) == "search"), None)
    if train is None:
        raise SystemExit("the store needs a training run (see this script's help)")
    e, run = exp.experiment_id, train.info.run_id
    out = {"mlflow_experiment": f"/#/experiments/{e}/runs",
           "mlflow_run_metrics": f"/#/experiments/{e}/runs/{run}/model-metrics",
           "mlflow_artifacts": f"/#/experiments/{e}/runs/{run}/artifacts/masked_views.png"}
    if search is not None:  # without a search in the store, its page is left out
        trials = [r.info.run_id for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
        out["mlflow_search"] = (f"/#/compare-runs?runs=[{','.join(repr(t) for t in trials)}]"
                                f"&experiments=[{e!r}]").replace("'", '"')
    if train.outputs and train.outputs.model_outputs:
        out["mlflow_logged_model"] = \
            f"/#/experiments/{e}/models/{train.outputs.model_outputs[0].model_id}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="micl-pretrain")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--size", default="1500,950", help="browser window, pixels")
    p.add_argument("--wait-ms", type=int, default=90000,
                   help="virtual time each page gets to load its data and draw its charts")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = pages(args.tracking_uri, args.experiment)
    port = free_port()
    server = start_server(args.tracking_uri, port)
    try:
        for name, path in paths.items():
            screenshot(chromium, f"http://127.0.0.1:{port}{path}", out / f"{name}.png",
                       args.size, args.wait_ms)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
