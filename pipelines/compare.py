"""Compare MLflow runs: print a ranked table, write a CSV and a plot.

    python pipelines/compare.py --experiment micl-pretrain
    python pipelines/compare.py --parent <search run id>          # the trials of one Tune search
    python pipelines/compare.py --filter "params.method.name = 'micl'" --metric knn_top1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from micl.compare import DEFAULT_EXPERIMENT, CompareError, compare  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiment", default=None,
                   help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT}; with --parent, "
                        "the parent's experiment)")
    p.add_argument("--parent", metavar="RUN_ID", default=None,
                   help="compare the child runs (trials) of this search run; the plot and CSV "
                        "are also logged to it")
    p.add_argument("--filter", dest="filter_string", default=None,
                   help="MLflow filter string, e.g. \"params.method.temperature = '0.07'\"")
    p.add_argument("--metric", default="knn_top1", help="rank by this metric (default knn_top1)")
    p.add_argument("--mode", choices=("max", "min"), default="max",
                   help="whether larger (max) or smaller (min) is better")
    p.add_argument("--out", default="compare", help="output directory (default ./compare)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--no-log", action="store_true",
                   help="with --parent: do not log the plot and CSV to the parent run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compare(experiment=args.experiment, parent_run_id=args.parent,
                         filter_string=args.filter_string, metric=args.metric, mode=args.mode,
                         out_dir=args.out, tracking_uri=args.tracking_uri,
                         log_to_parent=not args.no_log)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.text)
    n = len(result.table)
    print(f"\n{n} run{'s' * (n != 1)} ranked by {args.metric} ({args.mode}).")
    if "loss" in args.metric and "method.temperature" in result.table.columns:
        print("note: these runs differ in temperature, so their losses are not on one scale; "
              "rank by knn_top1 to choose between them.")
    print(f"table: {result.csv_path.resolve()}")
    print(f"plot:  {result.png_path.resolve()}")
    for artifact in result.logged_to_parent:
        print(f"logged to run {args.parent}: {artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
