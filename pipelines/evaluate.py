"""Evaluate a pre-trained encoder: weighted kNN and/or a linear probe on frozen cls features.

    python pipelines/evaluate.py --run-id <mlflow run id> --protocol linear
    python pipelines/evaluate.py --checkpoint runs/<run>/checkpoint_000004 --protocol all
    python pipelines/evaluate.py --run-id <id> --set data.knn_bank_size=60000

The numbers (`knn_top1`, `linear_top1`) are printed and logged to the run's own MLflow run at
the step of its last epoch (see micl.driver.evaluate_run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run id of a pre-training run")
    source.add_argument("--checkpoint", help="Ray Train checkpoint dir, state.pt, or "
                        "encoder_timm.pth (with timm_model.json beside it)")
    parser.add_argument("--protocol", choices=["knn", "linear", "all"], default="all")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field (data.*)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI "
                        "or sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--linear-epochs", type=int, default=90, help="linear probe epochs")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="low-shot linear probe: train on this fixed fraction of the train "
                        "labels (0.01, 0.1); logged as linear_top1_<p>pct")
    parser.add_argument("--label-seed", type=int, default=0, help="picks the low-shot subset")
    parser.add_argument("--probe-optimizer", choices=["sgd", "lars"], default="sgd",
                        help="linear probe optimiser: sgd (batch 256, blr 0.1) or MAE's lars "
                        "(for large sets: with --probe-batch 16384 --probe-warmup 10)")
    parser.add_argument("--probe-blr", type=float, default=0.1, help="lr = blr * batch / 256")
    parser.add_argument("--probe-batch", type=int, default=256)
    parser.add_argument("--probe-warmup", type=int, default=0, help="warmup epochs")
    parser.add_argument("--extract-workers", type=int, default=0, help="compute the features "
                        "with this many Ray Data actors on the cluster (a GPU each when there "
                        "are GPUs) instead of in this process: for ImageNet-sized sets")
    parser.add_argument("--no-log", action="store_true", help="print only, log nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)
    protocols = ("knn", "linear") if args.protocol == "all" else (args.protocol,)

    from micl.console import set_verbose
    from micl.driver import evaluate_run

    set_verbose(args.verbose)

    try:
        result = evaluate_run(run_id=args.run_id, checkpoint=args.checkpoint,
                              protocols=protocols, overrides=args.overrides,
                              tracking_uri=args.tracking_uri, log=not args.no_log,
                              linear_epochs=args.linear_epochs,
                              label_fraction=args.label_fraction, label_seed=args.label_seed,
                              probe={"optimizer": args.probe_optimizer, "blr": args.probe_blr,
                                     "batch_size": args.probe_batch,
                                     "warmup_epochs": args.probe_warmup},
                              extract_workers=args.extract_workers)
    except (ConfigError, ValueError) as e:  # includes DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n== micl evaluation ({result.bank_size} train / {result.query_size} test "
          "images) ==")
    for name, value in result.metrics.items():
        print(f"{name:<18} {value:.4f}")
    if result.run_id:
        print(f"logged to MLflow run {result.run_id} (step {result.step}) at "
              f"{result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
