"""A driver that tests/test_multinode.py submits with `ray job submit`: `pipelines/pretrain.py`
as users run it (its own console and exit code), with one step hook added that records, per
worker, which samples each step trained on, and holds rank 0 at given optimizer steps until the
test says go on, so that the test can take a node or the MLflow server away at a known point of
the run; then, when the run succeeded, `pipelines/tune.py` in the same driver.

    python tests/cluster_job.py OUT_DIR PAUSE_STEPS -- <pretrain.py args> [-- <tune.py args>]

PAUSE_STEPS: e.g. 3,14 (or "-": none). Writes OUT_DIR/ids.<rank> (one JSON line per step:
[epoch, step, sample ids]); at a pause step rank 0 writes OUT_DIR/paused.<step> and waits for
OUT_DIR/resume.<step> (each step pauses once: a restarted worker group passes it). The hook is
defined here, in `__main__`, so that Ray ships it to the workers by value; it reaches the run
through the one function the pipeline calls, wrapped here.

The search runs in the same job, as a user's script that pre-trains and then searches would:
a second job would cost a `ray job submit`, a job supervisor and a driver importing torch,
timm, MLflow and Ray again, and its tasks could not use the run's idle worker processes (a Ray
worker process serves one job).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import micl.driver  # noqa: E402
from pipelines import pretrain, tune  # noqa: E402


class RecordAndPause:
    """A step hook: the step's sample ids, appended to OUT_DIR/ids.<rank>; on rank 0 at a
    pause step, a wait for the test (at most 5 minutes)."""

    def __init__(self, out: str, pauses: list[int]) -> None:
        self.out, self.pauses = Path(out), pauses

    def __call__(self, info) -> None:
        ids = [int(i) for batch in info.batches for i in batch["sample_id"].tolist()]
        with open(self.out / f"ids.{info.rank}", "a") as f:
            f.write(json.dumps([info.epoch, info.step, ids]) + "\n")
        paused = self.out / f"paused.{info.step}"
        if info.rank != 0 or info.step not in self.pauses or paused.exists():
            return
        paused.touch()
        deadline = time.monotonic() + 300
        while not (self.out / f"resume.{info.step}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    out, pauses, dashes, *rest = argv
    assert dashes == "--", __doc__
    pretrain_args, search_args = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) \
        if "--" in rest else (rest, None)
    Path(out).mkdir(parents=True, exist_ok=True)
    hook = RecordAndPause(out, [int(s) for s in pauses.split(",")] if pauses != "-" else [])
    run = micl.driver.run_pretraining
    micl.driver.run_pretraining = lambda cfg, hooks=(): run(cfg, hooks=[*hooks, hook])
    cwd = os.getcwd()
    code = pretrain.main(pretrain_args)
    micl.driver.run_pretraining = run
    if code != 0 or search_args is None:
        return code
    # On the simulated cluster every node unpacks the job's package into one shared session
    # directory, and a node that meets it first deletes and unpacks it again in place: this
    # process's working directory may be gone by now, and Tune asks for it. The path is
    # there again (a real cluster's nodes each unpack to their own disk).
    os.chdir(cwd)
    return tune.main(search_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
