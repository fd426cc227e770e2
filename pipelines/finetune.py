"""Fine-tune a pre-trained encoder (or train from scratch with the same recipe) and report
top-1 / top-5 on the val split each epoch.

    python pipelines/finetune.py --init <pre-training MLflow run id>     # Fashion-MNIST, CPU
    python pipelines/finetune.py --init runs/micl-.../checkpoint_000005  # a checkpoint
    python pipelines/finetune.py --init scratch                          # the baseline
    python pipelines/finetune.py --config configs/finetune_imagenet_vitb16.yaml --init <id> \\
        --set run.num_workers=8 --set run.use_gpu=true

The run goes to the MLflow experiment `finetune.experiment` (default micl-finetune); the
pre-training run gets `finetune_top1` so `pipelines/compare.py --metric finetune_top1` ranks
pre-training runs by it. Reusing --set run.name=<name> resumes that fine-tuning run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune_fashion_mnist.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML fine-tuning config")
    parser.add_argument("--init", help="'scratch', a pre-training MLflow run id, a checkpoint "
                        "or an exported encoder (= --set finetune.init=...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own logs on the console")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"finetune.init={args.init}"] if args.init else [])]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from micl.console import set_verbose
    from micl.driver import PretrainError
    from micl.finetune import check_finetune, run_finetuning

    set_verbose(args.verbose)

    try:  # the data, the label count and the encoder, before Ray starts
        cfg, _ = check_finetune(cfg)
        result = run_finetuning(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = result.metrics
    print("\n== micl fine-tuning finished ==")
    print(f"run name        {result.run_name}  (resume with --set run.name={result.run_name})")
    print(f"MLflow run id   {result.mlflow_run_id or '(not recorded: tracking unavailable)'}")
    print(f"started from    {cfg.finetune.init}"
          + (f" (pre-training run {result.pretrain_run_id})" if result.pretrain_run_id else ""))
    print(f"val top-1       {m.get('val_top1', float('nan')):.4f}   top-5 "
          f"{m.get('val_top5', float('nan')):.4f}   ({int(m.get('val_images', 0))} images, "
          f"epoch {m.get('epoch')})")
    print(f"checkpoint      {result.checkpoint_path}")
    print(f"MLflow UI       mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
