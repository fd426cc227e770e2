"""Figures of finished pre-training runs: cls attention maps, a PCA of the test features, and
kNN top-1 against epoch for all given runs together.

    python pipelines/figures.py --run-id <id>
    python pipelines/figures.py --run-id <id1> --label micl --run-id <id2> --label mae \\
        --baseline "raw pixels=0.846" --baseline "random init=0.65"

Writes attention_<label>.png, embedding_<label>.png and knn_curves.png into --out and (unless
--no-log) logs them to each run under `figures/`. Only Fashion-MNIST runs for now.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from micl.config import ConfigError  # noqa: E402


def _baseline(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. 'raw pixels=0.846', not {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-id", dest="run_ids", action="append", required=True, metavar="ID",
                   help="MLflow run id of a finished pre-training run (repeat for several)")
    p.add_argument("--label", dest="labels", action="append", metavar="NAME",
                   help="name of each run in the figures, in --run-id order (default: run name)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", default="figures", help="output directory (default ./figures)")
    p.add_argument("--num-images", type=int, default=8, help="images in the attention figure")
    p.add_argument("--num-embed", type=int, default=5000, help="test images in the PCA figure")
    p.add_argument("--baseline", dest="baselines", action="append", type=_baseline, default=[],
                   metavar="NAME=VALUE", help="a dashed reference line in knn_curves.png")
    p.add_argument("--no-log", action="store_true", help="write the files only, log nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr clean
    from micl.compare import resolve_tracking_uri
    from micl.figures import make_run_figures

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        runs, knn_path = make_run_figures(args.run_ids, args.labels, uri, args.out,
                                          args.num_images, args.num_embed, not args.no_log,
                                          dict(args.baselines))
    except ConfigError as e:  # includes DataError: unknown run, unsupported source
        print(f"error: {e}", file=sys.stderr)
        return 2
    for rf in runs:
        print(f"{rf.label} ({rf.run_id}):")
        for p in rf.paths:
            print(f"  {p.resolve()}")
    if knn_path is None:
        print("no run has a knn_top1 history: no knn_curves.png")
    if not args.no_log:
        print(f"logged under figures/ of each run at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
