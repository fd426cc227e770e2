"""Fixed cost of one tiny pre-training fit: where the seconds go before any real training.

Run (from the repository root; about 5 min on 2 cores):

    .venv/bin/python benchmarks/fit_cost.py                  # this checkout
    cd /tmp/old && /path/to/micl/.venv/bin/python /path/to/micl/benchmarks/fit_cost.py \
        --code /tmp/old     # another checkout, same venv (from its directory: Ray puts the
                            # driver's working directory first on the workers' path)
    .venv/bin/python benchmarks/fit_cost.py --num-workers 1 0  # workers, then local mode

It starts one local Ray (2 CPUs, as the tests do), then fits the same tiny run `--fits` times
(synthetic 64 images, a 2-block 32-d ViT on 16 px, 1 epoch, 1 worker, kNN on 64 / 32 images,
a fresh SQLite MLflow store per fit) and prints, per fit, the wall time of `run_pretraining`.
The first fit also pays Ray's own warm-up; the later ones are what each test and each short
user run pays. The training itself (8 steps) takes about a second of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = [
    "data.source=synthetic", "data.synthetic_size=64", "model.img_size=16",
    "model.patch_size=4", "model.in_chans=3", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "method.mask_ratio=0.5", "data.batch_size=8", "data.map_batch_size=16",
    "data.knn_bank_size=64", "data.knn_query_size=32", "optim.epochs=1",
    "optim.warmup_epochs=0", "run.cpus_per_worker=1",
    "data.data_cpus=0.5",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                   help="repository whose micl/ to time")
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--num-workers", type=int, nargs="+", default=[1],
                   help="run.num_workers of the fits, one series each (0: Ray Train's local "
                        "mode, the loop in this process)")
    p.add_argument("--no-dashboard", action="store_true",
                   help="start the local Ray without its dashboard (as the tests do)")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, a.code)
    import ray

    from micl.config import load_config
    try:
        from micl.driver import run_pretraining
    except ImportError:  # before the driver was micl/driver.py
        from micl.pretrain import run_pretraining
    try:  # how the product starts a local Ray, where it has the function
        from micl.driver import connect_ray
        connect_ray(num_cpus=2, address="local", dashboard=False if a.no_dashboard else None)
    except (ImportError, TypeError):  # older code: no such function, or no such argument
        ray.init(address="local", num_cpus=2, include_dashboard=not a.no_dashboard,
                 log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": a.code}})
    for workers in a.num_workers:
        times = []
        for i in range(a.fits):
            tmp = Path(tempfile.mkdtemp())
            cfg = load_config(overrides=[*OVERRIDES, f"run.storage_path={tmp / 'runs'}",
                                         f"run.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                                         f"run.name=fit{i}", f"run.num_workers={workers}"])
            t0 = time.perf_counter()
            result = run_pretraining(cfg)
            times.append(time.perf_counter() - t0)
            print(f"num_workers={workers} fit {i + 1}: {times[-1]:.1f} s "
                  f"(epochs {result.metrics.get('epoch')})", flush=True)
        later = times[1:] or times
        print(f"code {a.code}, num_workers={workers}: first fit {times[0]:.1f} s, later fits "
              f"median {statistics.median(later):.1f} s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
