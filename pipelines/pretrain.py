"""Pre-train an encoder.

    python pipelines/pretrain.py                                   # Fashion-MNIST demo, local
    python pipelines/pretrain.py --config configs/imagenet_vitl16.yaml --set run.num_workers=8
    ray job submit --working-dir . -- python pipelines/pretrain.py --config ...

Reusing --set run.name=<name> resumes that run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)
    try:  # the generic fields first: a typo there needs no torch, Ray or method registry
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from micl.console import set_verbose
    from micl.data.sources import DataError
    from micl.driver import PretrainError, check, run_pretraining

    set_verbose(args.verbose)

    try:  # then the data source's and the method's fields, before Ray starts
        cfg = check(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        result = run_pretraining(cfg)
    except (ConfigError, DataError, PretrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = result.metrics
    print("\n== micl pre-training finished ==")
    print(f"run name        {result.run_name}  (resume with --set run.name={result.run_name})")
    print(f"MLflow run id   {result.mlflow_run_id or '(not recorded: tracking unavailable)'}")
    if "knn_top1_init" in m:
        print(f"kNN top-1       random init {m['knn_top1_init']:.4f} -> trained "
              f"{m.get('knn_top1', float('nan')):.4f}")
    print("final metrics   " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                       if isinstance(v, int | float)))
    print(f"checkpoint      {result.checkpoint_path}")
    print(f"MLflow UI       mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
