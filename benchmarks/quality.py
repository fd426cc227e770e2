"""Representation quality on Fashion-MNIST: every method at the same encoder size and budget.

Run (from the repository root; about 50 min on 2 cores: four pre-trainings of <= 15 min each,
one after the other, then a few seconds of evaluation each):

    .venv/bin/python benchmarks/quality.py
    .venv/bin/python benchmarks/quality.py --methods micl mae --epochs 3   # a subset

What it does:
- pre-trains MiCL, MAE, MACRL and MimCo (teacher = this MiCL run) with `pipelines/pretrain.py`
  in child processes, exactly as a user runs them: each from its own config file (CONFIGS:
  `configs/fashion_mnist_quality.yaml` for MiCL, `configs/fashion_mnist_<method>.yaml` for the
  others), with kNN after every epoch. The files share the ViT (embed 128, depth 6, 4 heads,
  patch 7), the data, the batch and the optimiser (checked before anything runs); they differ
  in the method's own fields (small decoders / projectors) and in the epochs that fit a budget
  of <= 15 min each;
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
# One config file per method. Each holds the method's own fields and its epochs: the budget is
# time, <= 15 min per method on this 2-core machine, so MACRL (two branches, two decoder
# passes) and MimCo (a teacher forward on the whole image), about twice MiCL's step, get fewer
# epochs. MimCo's teacher is not in its file: it is this invocation's MiCL run.
CONFIGS: dict[str, str] = {
    "micl": "configs/fashion_mnist_quality.yaml",
    "mae": "configs/fashion_mnist_mae.yaml",
    "macrl": "configs/fashion_mnist_macrl.yaml",
    "mimco": "configs/fashion_mnist_mimco.yaml",
}


def read_yaml(method: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / CONFIGS[method]).read_text()) or {}


def method_fields(method: str, with_epochs: bool = True) -> str:
    """`method.<field>=<value> ...` of a method's config file (for the notes under the table)."""
    values = read_yaml(method)
    fields = [f"method.{k}={v}" for k, v in (values.get("method") or {}).items()]
    epochs = (values.get("optim") or {}).get("epochs") if with_epochs else None
    return " ".join(fields + ([f"optim.epochs={epochs}"] if epochs else []))


def shared_part(values: dict) -> dict:
    """What every method's file must have in common: encoder, data, optimiser but its epochs."""
    optim = {k: v for k, v in (values.get("optim") or {}).items() if k != "epochs"}
    return {"model": values.get("model"), "data": values.get("data"), "optim": optim}


def check_shared(methods: list[str]) -> None:
    """The comparison only means something with the same encoder, data and optimiser."""
    base = shared_part(read_yaml("micl"))
    for m in methods:
        ours = shared_part(read_yaml(m))
        for section, value in ours.items():
            if value != base[section]:
                raise SystemExit(f"[quality] {CONFIGS[m]}: its `{section}` section differs from "
                                 f"{CONFIGS['micl']}'s (epochs aside, every method trains the "
                                 "same encoder on the same data with the same optimiser)")


def pretrain(method: str, overrides: list[str], run_name: str, log_dir: Path
             ) -> tuple[str, float]:
    """Runs pipelines/pretrain.py in a child process; returns (MLflow run id, wall seconds)."""
    cmd = [sys.executable, "pipelines/pretrain.py", "--config", CONFIGS[method],
           *[a for o in [*overrides, f"run.name={run_name}"] for a in ("--set", o)]]
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
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, help="pre-training epochs for every method "
                   "(default: each method's config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="shared override for every method")
    p.add_argument("--teacher-run-id", help="MimCo's teacher (default: this run's MiCL)")
    p.add_argument("--reuse", action="append", default=[], metavar="METHOD=RUN_ID",
                   help="evaluate this earlier run of METHOD instead of training it again "
                   "(its wall time: the MLflow run's start to end)")
    p.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="run-name suffix")
    args = p.parse_args()
    check_shared(args.methods)

    import torch
    from mlflow.tracking import MlflowClient

    from micl.artifacts import load_encoder
    from micl.config import load_config
    from micl.evaluate import pixel_knn_top1
    from micl.models import MaskedViT
    from micl.tracking import RunLogger, tracking_uri

    torch.set_num_threads(2)
    machine = _common.machine()
    shared = [*args.overrides] + ([f"optim.epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config(ROOT / CONFIGS["micl"], overrides=shared)  # the shared encoder and data
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
        epochs = (loaded.epoch or args.epochs
                  or (read_yaml(method).get("optim") or {}).get("epochs") or cfg.optim.epochs)
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
        + "; ".join(f"{m}: {CONFIGS[m]} ({method_fields(m, not args.epochs)})"
                    for m in order) + ".",
        "wall min: the whole `pipelines/pretrain.py` process (Ray start-up, per-epoch kNN, "
        "checkpoints included), one method at a time on this machine.",
    ]
    _common.append_result("Representation quality, Fashion-MNIST", _common.markdown_table(
        header, rows), notes, machine)


if __name__ == "__main__":
    main()
