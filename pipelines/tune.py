"""Search mask ratio, temperature (and more) with Ray Tune; rank trials by kNN top-1.

    python pipelines/tune.py --space tune_spaces/mask_ratio_temperature.yaml
    python pipelines/tune.py --space tune_spaces/mask_ratio_temperature.yaml \
        --config configs/fashion_mnist_quality.yaml --set optim.epochs=4 --name fmnist-grid
    ray job submit --working-dir . -- python pipelines/tune.py --space ...

Running the same --name again resumes an interrupted search. The ranked table, a CSV and a
plot (heatmap for grids) are written to --out and logged to the search's MLflow parent run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_quality.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a base config field")
    parser.add_argument("--name", help="search name (reuse it to resume an interrupted search)")
    parser.add_argument("--out", default="compare", help="where the table CSV and plot go")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)

    from micl.console import set_verbose
    from micl.driver import check

    set_verbose(args.verbose)
    from micl.tune_space import load_space

    try:  # every config and space error surfaces here, before Ray starts
        base = check(load_config(args.config, args.overrides))
        space = load_space(args.space, base=base)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[micl] search: {space.summary()}")

    from micl.compare import CompareError, compare
    from micl.data.sources import DataError
    from micl.tune import run_search

    try:
        result = run_search(base, space, args.name)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n== search {result.name} finished: {len(result.trials)} trials ==")
    print(f"MLflow parent run  {result.parent_run_id}")
    for trial in result.trials:  # the last line of a failed trial's error: its cause
        if trial["error"]:
            lines = trial["error"].strip().splitlines()
            print(f"error: trial {trial['params']} failed: {lines[-1] if lines else '?'}",
                  file=sys.stderr)
    if result.best_metric is None:
        print(f"error: no trial reported {space.ranking_metric}; nothing to compare",
              file=sys.stderr)
        return 1
    print(f"best {space.ranking_metric}  {result.best_metric}  with {result.best_params}")
    try:
        report = compare(parent_run_id=result.parent_run_id, metric=space.ranking_metric,
                         mode=space.mode, out_dir=args.out, tracking_uri=result.tracking_uri)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.text)
    print(f"table CSV  {report.csv_path}\nplot PNG   {report.png_path} (also in the parent run)")
    print(f"MLflow UI  mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
