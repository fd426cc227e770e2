"""Fine-tuning on Fashion-MNIST: MiCL vs MAE vs scratch with the same recipe, plus low-shot.

    python benchmarks/finetune.py --pretrain-epochs 3 --finetune-epochs 3 --out /tmp/ftbench

Steps (each result is written to <out>/results.json as soon as it exists, so a cut-short run
keeps what it measured):
1. pre-train MiCL (configs/fashion_mnist_quality.yaml) and MAE (configs/fashion_mnist_mae.yaml)
   for --pretrain-epochs each;
2. fine-tune each encoder and a from-scratch model with configs/finetune_fashion_mnist.yaml for
   --finetune-epochs (the same recipe and epochs for all three): val top-1 on the 10k test split;
3. low-shot linear probes (1% and 10% of the 60k train labels, fixed subsets) of both encoders
   and of raw pixels;
4. with --lowshot-finetune-epochs N: low-shot fine-tuning (10% and 1%) of all three for N
   epochs of the subset.
At the end, a table is appended to BENCHMARKS.md with the machine and the wall time of each step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import ROOT, append_result, machine, markdown_table, start_ray

from micl.config import load_config
from micl.data.sources import read_fashion_mnist
from micl.data.stream import label_subset
from micl.driver import evaluate_run, run_pretraining
from micl.evaluate import linear_probe
from micl.finetune import run_finetuning

FRACTIONS = (0.01, 0.1)


def record(out: Path, key: str, value: dict) -> None:
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=1))
    print(f"[bench] {key}: {value}", flush=True)


def store(out: Path) -> list[str]:
    return [f"run.storage_path={out / 'runs'}", f"run.tracking_uri=sqlite:///{out / 'mlflow.db'}"]


def pretrain(out: Path, name: str, config: str, epochs: int) -> str:
    t0 = time.time()
    cfg = load_config(ROOT / config, [f"optim.epochs={epochs}", f"run.eval_every={epochs}",
                                      f"optim.warmup_epochs={min(1, epochs)}", *store(out)])
    result = run_pretraining(cfg)
    record(out, f"pretrain_{name}", {"run_id": result.mlflow_run_id, "epochs": epochs,
                                     "knn_top1": result.metrics.get("knn_top1"),
                                     "seconds": round(time.time() - t0)})
    return result.mlflow_run_id


def finetune(out: Path, name: str, init: str, epochs: int, fraction: float = 1.0,
             overrides: tuple[str, ...] = (), tag: str = "") -> None:
    t0 = time.time()
    cfg = load_config(ROOT / "configs/finetune_fashion_mnist.yaml",
                      [f"finetune.init={init}", f"optim.epochs={epochs}",
                       f"finetune.label_fraction={fraction}", *overrides, *store(out)])
    m = run_finetuning(cfg).metrics
    record(out, f"finetune_{name}_{fraction:g}{tag}", {
        "epochs": epochs, "label_fraction": fraction, "val_top1": m.get("val_top1"),
        "val_top5": m.get("val_top5"), "seconds": round(time.time() - t0)})


def pixel_linear(out: Path, fraction: float) -> None:
    """The raw-pixel baseline: the same linear probe on normalised 784-pixel vectors."""
    t0 = time.time()
    x, y = read_fashion_mnist(None, "train")
    xt, yt = read_fashion_mnist(None, "test")
    keep = torch.from_numpy(label_subset(torch.arange(len(x)).numpy(), fraction, 0))

    def pixels(a):
        return (torch.from_numpy(a).float().flatten(1) / 255 - 0.286) / 0.353

    top1 = linear_probe(pixels(x)[keep], torch.from_numpy(y).long()[keep], pixels(xt),
                        torch.from_numpy(yt).long())
    record(out, f"linear_pixels_{fraction:g}", {"linear_top1": top1,
                                               "seconds": round(time.time() - t0)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lowshot-finetune-epochs", type=int, default=0)
    p.add_argument("--out", default="/tmp/ftbench")
    p.add_argument("--pretrained", nargs=2, metavar=("MICL_RUN", "MAE_RUN"),
                   help="skip pre-training: these MLflow run ids (in <out>/mlflow.db)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of configs/finetune_fashion_mnist.yaml")
    p.add_argument("--tag", default="", help="suffix of this run's result keys")
    p.add_argument("--no-lowshot", action="store_true", help="fine-tune on all labels only")
    p.add_argument("--only-lowshot", action="store_true",
                   help="with --pretrained: skip the full-label fine-tunes and linear probes")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_ray(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=True)
    t0 = time.time()
    runs = dict(zip(("micl", "mae"), args.pretrained, strict=True)) if args.pretrained else {
        "micl": pretrain(out, "micl", "configs/fashion_mnist_quality.yaml", args.pretrain_epochs),
        "mae": pretrain(out, "mae", "configs/fashion_mnist_mae.yaml", args.pretrain_epochs)}
    ft = {"overrides": tuple(args.finetune_set), "tag": args.tag}
    for name, init in [] if args.only_lowshot else [
            ("micl", runs["micl"]), ("scratch", "scratch"), ("mae", runs["mae"])]:
        finetune(out, name, init, args.finetune_epochs, **ft)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    for fraction in () if args.no_lowshot or args.only_lowshot else FRACTIONS:
        pixel_linear(out, fraction)
        for name, run_id in runs.items():
            t1 = time.time()
            m = evaluate_run(run_id=run_id, protocols=["linear"], tracking_uri=uri,
                             label_fraction=fraction).metrics
            record(out, f"linear_{name}_{fraction:g}", {**m, "seconds": round(time.time() - t1)})
    if args.lowshot_finetune_epochs:
        for fraction in reversed(FRACTIONS):
            for name, init in [("micl", runs["micl"]), ("scratch", "scratch"),
                               ("mae", runs["mae"])]:
                finetune(out, name, init, args.lowshot_finetune_epochs, fraction, **ft)
    results = json.loads((out / "results.json").read_text())
    rows = [[k, json.dumps({a: (round(b, 4) if isinstance(b, float) else b)
                            for a, b in v.items() if a != "run_id"})] for k, v in results.items()]
    append_result("Fine-tuning on Fashion-MNIST (issue 16)", markdown_table(["step", "result"],
                                                                              rows),
                  [f"total wall time {time.time() - t0:.0f} s"], machine_line=machine())


if __name__ == "__main__":
    main()
