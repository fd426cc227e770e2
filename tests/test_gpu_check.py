"""`benchmarks/gpu_check.py --dry-run`: every part of the GPU check on CPU at tiny sizes, on the
session's Ray, so that the one command a lent GPU gets minutes for still works that day."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.e2e
def test_the_gpu_check_dry_run_runs_every_part(ray_local, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    by_part: dict[str, list[list]] = {}
    for row in rows:
        by_part.setdefault(row[0], []).append(row)
    assert set(by_part) == {"flops", *gpu_check.PARTS}
    assert not [r for r in rows if r[1] in ("FAILED", "skipped")]
    assert by_part["flops"][0][-1] == "OK"
    # The OOM probe found a batch for MiCL and for MAE and timed it; compiled, the step runs.
    assert [r[1] for r in by_part["step"]] == ["ViT-pico/8 r=0.75", "MAE ViT-pico/8 r=0.75"]
    assert all(r[2].startswith("16") and r[3] > 0 for r in by_part["step"])
    assert by_part["compile"][0][3] > 0
    # The profile splits the step's time by kind of work; matrix products are among them.
    assert "matmul" in by_part["profile"][0][-1] and "ms per step" in by_part["profile"][0][-1]
    assert "Self CPU" in (tmp_path / "profile.txt").read_text()
    # Each attention kernel either timed the step or said why it could not (CPU: no cuDNN).
    kernels = {r[1].rsplit(", ", 1)[1]: r for r in by_part["attention"]}
    assert set(kernels) == {"flash_attention", "efficient_attention", "cudnn_attention", "math"}
    assert kernels["math"][3] > 0
    assert all((r[3] or 0) > 0 or r[-1].startswith("not run") for r in kernels.values())
    e2e = by_part["e2e"][0]
    assert e2e[3] > 0 and "data wait" in e2e[-1] and "-bound" in e2e[-1]
    finetune, knn, tune = by_part["extras"]
    assert "1/1 trials finished" in tune[-1]  # the dry run's one trial
    assert "val top-1" in finetune[-1] and "knn_top1" in knn[-1]
    # The end-to-end run logged the loop's data-wait metrics and got its fine-tuning result.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               "tags.`micl.role` = 'train'")
    assert {"data_wait_s", "data_start_s", "finetune_top1"} <= set(run.data.metrics)
