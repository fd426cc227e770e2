"""Representation quality on Fashion-MNIST: every method at the same encoder size and budget.

Run (from the repository root; about 50 min on 2 cores: four pre-trainings of <= 15 min each,
one after the other, then a few seconds of evaluation each):

    .venv/bin/python benchmarks/quality.py
    .venv/bin/python benchmarks/quality.py --methods micl mae --epochs 3   # a subset

What it does:
- pre-trains MiCL, MAE, MACRL and MimCo (teacher = this MiCL run) with `pipelines/pretrain.py`
  in child processes, exactly as a user runs it: `configs/fashion_mnist_tiny.yaml` (the ViT is
  the same for all: embed 128, depth 6, 4 heads, patch 4), the same batch and optimiser, a
  budget of <= 15 min each (EPOCHS) and kNN after every epoch; only the method's own fields
  differ (small decoders / projectors, see METHODS);
- evaluates each encoder on the full test split (10,000 images) against the full train split
  (60,000) as kNN bank / probe training set: weighted kNN (k=20, T=0.07, cosine, on the
  L2-normalised cls output) and MAE's linear probe (BatchNorm + Linear, 90 epochs, frozen cls
  features of the centred image, no augmentation), plus the two baselines: raw pixels (kNN on
  normalised pixels) and the randomly initialised encoder;
- prints one table and appends it, with the command and machine, to BENCHMARKS.md; the
  kNN/probe numbers are also logged to each method's MLflow run as `test_knn_top1` and
  `test_linear_top1` (its per-epoch `knn_top1` used a subsampled bank).

The evaluation reads the IDX files directly (no Ray): at 28x28 the eval stream's centre crop is
the whole image, so this is the same input the training loop's kNN sees.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import _common

ROOT = _common.ROOT
CONFIG = "configs/fashion_mnist_tiny.yaml"

# Method-specific fields only; everything else (encoder, optimiser, epochs, data) is shared.
METHODS: dict[str, list[str]] = {
    "micl": [],
    "mae": ["method.name=mae", "method.mask_ratio=0.75", "method.decoder_dim=128",
            "method.decoder_depth=2", "method.decoder_heads=4"],
    "macrl": ["method.name=macrl", "method.mask_ratio=0.75", "method.strong_mask_ratio=0.9",
              "method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4",
              "method.proj_hidden_dim=512", "method.proj_dim=128", "method.temperature=0.2"],
    "mimco": ["method.name=mimco", "method.mask_ratio=0.5", "method.decoder_dim=128",
              "method.decoder_depth=2", "method.decoder_heads=4", "method.temperature=0.2",
              "method.patch_negatives=image"],
}


# The budget is time: <= 15 min per method on this 2-core machine (measured in the table).
# MACRL (two branches, two decoder passes) and MimCo (a teacher forward on the whole image)
# cost about twice MiCL's step, so they get fewer epochs within it. None: the config's.
EPOCHS: dict[str, int | None] = {"micl": None, "mae": None, "macrl": 2, "mimco": 2}


def pretrain(method: str, overrides: list[str], run_name: str, log_dir: Path
             ) -> tuple[str, float]:
    """Runs pipelines/pretrain.py in a child process; returns (MLflow run id, wall seconds)."""
    cmd = [sys.executable, "pipelines/pretrain.py", "--config", CONFIG,
           *[a for o in [*METHODS[method], *overrides, f"run.name={run_name}"]
             for a in ("--set", o)]]
    log = log_dir / f"{run_name}.log"
    print(f"[quality] {method}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    found = re.search(r"MLflow run id\s+([0-9a-f]{32})", text)
    if rc != 0 or not found:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"[quality] {method} failed (exit {rc}); last lines of {log}:\n{tail}")
    return found.group(1), wall


def load_split(path: str | None, split: str):
    """uint8 images [N, 1, 28, 28] and labels [N] of a Fashion-MNIST split, from the IDX files."""
    import torch

    from micl.data.sources import DataError, read_fashion_mnist

    try:
        images, labels = read_fashion_mnist(path, split)
    except DataError as e:
        raise SystemExit(f"[quality] {e}") from None
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64"))


def features(encoder, images, mean: list[float], std: list[float]):
    """Raw cls features [N, D] of the whole images (eval mode, batches of 1000)."""
    import torch

    from micl.evaluate import extract_features

    batches = ({"image": images[i : i + 1000], "label": torch.zeros(0)}
               for i in range(0, len(images), 1000))
    return extract_features(encoder, batches, mean, std, l2=False)[0]


def evaluate(encoder, cfg, data) -> tuple[float, float]:
    import torch.nn.functional as F

    from micl.evaluate import knn_top1, linear_probe

    (train_x, train_y), (test_x, test_y) = data
    bank = features(encoder, train_x, cfg.data.mean, cfg.data.std)
    query = features(encoder, test_x, cfg.data.mean, cfg.data.std)
    knn = knn_top1(F.normalize(bank, dim=-1), train_y, F.normalize(query, dim=-1), test_y)
    linear = linear_probe(bank, train_y, query, test_y, epochs=90, seed=cfg.run.seed)
    return knn, linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, help="pre-training epochs for every method "
                   "(default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="shared override for every method")
    p.add_argument("--teacher-run-id", help="MimCo's teacher (default: this run's MiCL)")
    p.add_argument("--reuse", action="append", default=[], metavar="METHOD=RUN_ID",
                   help="evaluate this earlier run of METHOD instead of training it again "
                   "(its wall time: the MLflow run's start to end)")
    p.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="run-name suffix")
    args = p.parse_args()

    import torch
    from mlflow.tracking import MlflowClient

    from micl.config import load_config
    from micl.evaluate import pixel_knn_top1
    from micl.models import MaskedViT
    from micl.models.pretrained import load_encoder
    from micl.tracking import RunLogger, tracking_uri

    torch.set_num_threads(2)
    machine = _common.machine()
    shared = [*args.overrides] + ([f"optim.epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config(ROOT / CONFIG, overrides=shared)
    data = (load_split(cfg.data.path, "train"), load_split(cfg.data.path, "test"))
    log_dir = ROOT / "runs" / "quality-logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    rows: list[list[object]] = []
    (train_x, train_y), (test_x, test_y) = data
    pixels = pixel_knn_top1(train_x, train_y, test_x, test_y)
    rows.append(["raw pixels", "-", "-", "-", pixels, "-", "-"])
    torch.manual_seed(cfg.run.seed)
    knn, linear = evaluate(MaskedViT.from_config(cfg.model), cfg, data)
    rows.append(["random init", "-", "-", "-", knn, linear, "-"])
    print(f"[quality] raw pixels kNN {pixels:.4f}; random init kNN {knn:.4f} linear {linear:.4f}",
          flush=True)

    uri = tracking_uri(cfg)
    reused = dict(r.split("=", 1) for r in args.reuse)
    client = MlflowClient(uri)
    teacher = args.teacher_run_id
    order = sorted(args.methods, key=lambda m: m == "mimco")  # MimCo needs its teacher first
    for method in order:
        extra = ["run.eval_every=1", *shared]  # per-epoch kNN for the curves
        if EPOCHS[method] and not args.epochs:
            extra.append(f"optim.epochs={EPOCHS[method]}")
        if method == "mimco":
            if teacher is None:
                raise SystemExit("[quality] mimco needs a teacher: include micl in --methods or "
                                 "give --teacher-run-id")
            extra.append(f"method.teacher_run_id={teacher}")
        if method in reused:
            run_id = reused[method]
            info = client.get_run(run_id).info
            wall = (info.end_time - info.start_time) / 1000
        else:
            run_id, wall = pretrain(method, extra, f"quality-{method}-{args.tag}", log_dir)
        if method == "micl" and teacher is None:
            teacher = run_id
        loaded = load_encoder(run_id=run_id, tracking_uri=uri)
        knn, linear = evaluate(loaded.encoder, cfg, data)
        logger = RunLogger(uri, run_id)
        logger.metrics({"test_knn_top1": knn, "test_linear_top1": linear},
                       step=int(loaded.epoch or 0))
        ips = client.get_run(run_id).data.metrics.get("images_per_s", float("nan"))
        epochs = loaded.epoch or args.epochs or EPOCHS[method] or cfg.optim.epochs
        rows.append([method, epochs, round(wall / 60, 1), ips, knn, linear, run_id])
        print(f"[quality] {method}: kNN {knn:.4f} linear {linear:.4f} in {wall / 60:.1f} min "
              f"(run {run_id})", flush=True)

    header = ["encoder", "epochs", "wall min", "train img/s", "kNN top-1", "linear top-1",
              "MLflow run"]
    notes = [
        "Fashion-MNIST: kNN bank / probe training set = the 60,000 train images, queries / test "
        "= the 10,000 test images; kNN k=20, T=0.07, cosine; linear probe: BatchNorm + Linear, "
        "90 epochs, frozen cls features.",
        f"Same ViT for every method ({cfg.model.embed_dim}-d, depth {cfg.model.depth}, "
        f"{cfg.model.num_heads} heads, patch {cfg.model.patch_size}), same optimiser (blr "
        f"{cfg.optim.blr}, batch {cfg.data.batch_size}, warmup {cfg.optim.warmup_epochs} "
        "epoch) and a <= 15 min budget (epochs column); method fields: "
        + "; ".join(f"{m}: {' '.join(METHODS[m]) or 'the config'}" for m in order) + ".",
        "wall min: the whole `pipelines/pretrain.py` process (Ray start-up, per-epoch kNN, "
        "checkpoints included), one method at a time on this machine.",
    ]
    _common.append_result("Representation quality, Fashion-MNIST", _common.markdown_table(
        header, rows), notes, machine)


if __name__ == "__main__":
    main()
