"""Training-loop overhead: Ray Train's TorchTrainer vs the same loop in a plain process.

Run (from the repository root; ~3 min per repeat on 2 cores):

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/trainer.py
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/trainer.py --repeats 2 --threads 2
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/trainer.py --steps-per-epoch 20  # 3 s epochs

What it measures: optimizer steps per second of MiCL on CPU (a small ViT so that a step is
~0.15 s and per-step overheads show; 100 steps per epoch, ~14 s, so that the once-per-epoch
cost of opening a streaming iterator (~0.3 s) does not dominate), two ways, on the same
synthetic batches:

- TorchTrainer: `micl.driver.build_trainer` -> `trainer.fit()` with 1 worker, i.e. the real
  `micl.train.train_loop_per_worker` reading its shard through Ray Data (one worker iterates
  the stream itself; several would each get a part of a streaming split). The callback that
  collects the epochs' rates asks for a TorchTrainer: a one-worker run without one trains
  alone in a Ray task (`micl.driver.SoloFit`), the same loop without Ray Train around it. The
  train stream is materialised before `fit()` (the same blocks every epoch), so the number is
  the loop's overhead and not the CPU cost of decoding, which `benchmarks/ingest.py` measures.
- plain: one Python process without Ray, the same objective, optimizer (`build_optimizer`),
  per-step lr (`lr_at`), device transfer + `normalize` (`to_device`) and optimizer step
  (`train_step`: forward, backward, grad-norm clip, finiteness check, step) as the loop, all
  imported from micl.train, over the same batches held in memory as torch tensors.

Steady state: each epoch's time runs from the first batch request to the last optimizer step
(the loop's own `images_per_s` metric, collected by a Ray Train UserCallback), so Ray start-up
(10-15 s), worker start, model build, the kNN evaluation and the checkpoint are excluded; the
first epoch (iterator and allocator warm-up) is dropped and epochs 2..k are averaged. The plain
loop is timed the same way. `fit()` wall time is reported too, for the start-up cost.
Each side runs in its own child process, alternating (A B A B with --repeats) because the
machine is shared: compare the ratio, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def make_config(args: dict[str, Any], storage: str):
    from micl.config import Config

    cfg = Config()
    m, d = cfg.model, cfg.data
    m.name, m.img_size, m.patch_size, m.in_chans = args["model"], args["img_size"], \
        args["patch_size"], 3
    cfg.method.name = "micl"
    cfg.method.args["mask_ratio"] = args["mask_ratio"]
    d.source, d.synthetic_size, d.synthetic_classes = "synthetic", \
        args["batch_size"] * args["steps_per_epoch"], 10
    d.batch_size, d.map_batch_size = args["batch_size"], args["batch_size"]
    d.knn_bank_size, d.knn_query_size = 256, 128
    d.data_cpus = 1.0
    o = cfg.optim
    o.epochs, o.warmup_epochs, o.blr = args["epochs"], 1.0, 5e-4
    r = cfg.run
    r.num_workers, r.cpus_per_worker, r.torch_threads = 1, 1.0, args["threads"]
    r.storage_path, r.eval_every, r.checkpoint_every = storage, 10**6, 10**6
    r.keep_last, r.seed = 1, 0
    from micl.driver import check, resolve

    # check: generic fields, data source and method (fills in MiCL's defaults); resolve: absolute
    # tracking URI and storage path, which build_trainer requires.
    return resolve(check(cfg))


def synthetic_batches(cfg) -> list[dict[str, Any]]:
    """The training stream's batches for epoch 0, computed in-process (no Ray) with the same
    mapper and the same synthetic source images as the Ray run."""
    import numpy as np
    import torch

    from micl.data.sources import synthetic_images
    from micl.data.stream import _TrainMapper
    from micl.objectives import stream_spec

    n, bs = cfg.data.synthetic_size, cfg.data.batch_size
    ids = np.arange(n, dtype=np.int64)
    images, labels = synthetic_images(ids, cfg.model.img_size, cfg.model.in_chans,
                                      cfg.data.synthetic_classes)
    mapper = _TrainMapper(cfg, 0, stream_spec(cfg))
    out = mapper({"image": images, "label": labels, "sample_id": ids,
                  "path": np.full(n, "", dtype=object)})
    out.pop("skipped")
    return [{k: torch.as_tensor(v[i : i + bs]) for k, v in out.items()}
            for i in range(0, n - bs + 1, bs)]


def run_plain(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from micl.objectives import build_objective
    from micl.schedule import lr_at
    from micl.train import base_lr, build_optimizer, to_device, train_step

    cfg = make_config(args, tempfile.mkdtemp())
    torch.set_num_threads(cfg.run.torch_threads)
    torch.manual_seed(cfg.run.seed)
    batches = synthetic_batches(cfg)
    device = torch.device("cpu")
    model = build_objective(cfg)
    opt = build_optimizer(model, cfg, world=1, on_gpu=False)
    peak = base_lr(cfg, 1)
    per_epoch, step, epochs = len(batches), 0, []
    for epoch in range(cfg.optim.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_images = 0.0, 0
        for raw in batches:
            batch = to_device(dict(raw), cfg, device)
            lr = lr_at(min(step / per_epoch, epoch + 1), peak, cfg.optim.warmup_epochs,
                       cfg.optim.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            result = train_step(model, opt, [batch], cfg.optim.clip_grad)
            if not result.finite:
                raise FloatingPointError(f"non-finite loss or gradient at step {step + 1}")
            loss_sum += result.loss.item()  # the loop's EpochSums.add does the same per step
            step += 1
            model.after_step(step, per_epoch * cfg.optim.epochs)
            n_images += result.images
        epochs.append(n_images / (time.perf_counter() - t0))
    return {"images_per_s": epochs, "steps_per_epoch": per_epoch}


def run_trainer(args: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.train

    storage = tempfile.mkdtemp(prefix="micl-bench-trainer-")
    metrics_file = Path(storage) / "metrics.jsonl"

    class Collect(ray.train.UserCallback):
        """Runs in the Train controller: appends every report's rank-0 metrics to a file."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    init_s = _common.start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                               object_store_memory=2 * 2**30,
                               runtime_env={"env_vars": {"PYTHONPATH": str(_common.ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    from micl.driver import build_trainer

    cfg = make_config(args, storage)
    t = time.perf_counter()
    trainer = build_trainer(cfg, f"bench-{os.getpid()}", None, callbacks=[Collect()])
    trainer.datasets["train"] = trainer.datasets["train"].materialize()
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t
    ray.shutdown()
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    return {"images_per_s": [r["images_per_s"] for r in rows if "images_per_s" in r],
            "init_s": init_s, "build_s": build_s, "fit_s": fit_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_pico")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4, help="epochs 2..k are the steady state")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    spec = {k: getattr(args, k) for k in ("model", "img_size", "patch_size", "mask_ratio",
                                          "batch_size", "steps_per_epoch", "epochs", "threads")}
    if args.child:
        kind = json.loads(args.child)["kind"]
        res = run_plain(spec) if kind == "plain" else run_trainer(spec)
        print("RESULT " + json.dumps(res))
        return

    machine = _common.machine()
    rows, ratios = [], []
    for rep in range(args.repeats):
        order = ["plain", "trainer"] if rep % 2 == 0 else ["trainer", "plain"]
        got = {}
        for kind in order:
            print(f"[bench] {kind} (repeat {rep + 1}) ...", flush=True)
            env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child",
                                  json.dumps({"kind": kind})], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
                raise SystemExit(f"{kind} run failed")
            res = json.loads([x for x in out.stdout.splitlines()
                              if x.startswith("RESULT ")][-1][7:])
            ips = res["images_per_s"]
            steady = statistics.fmean(ips[1:]) / args.batch_size
            got[kind] = steady
            rows.append([kind if kind == "plain" else "TorchTrainer (1 worker)", rep + 1,
                         ips[0] / args.batch_size, steady, steady * args.batch_size,
                         f"{res['init_s']:.1f} + {res['build_s']:.1f} + {res['fit_s']:.1f}"
                         if kind == "trainer" else "-", ""])
        ratios.append(got["trainer"] / got["plain"])
        rows[-1][-1] = rows[-2][-1] = f"{ratios[-1]:.2f}"
    header = ["loop", "rep", "epoch 1 steps/s", "steady steps/s (epochs 2..k)",
              "steady img/s", "ray.init + build + fit() s", "TorchTrainer / plain"]
    notes = [
        f"MiCL, {args.model} at {args.img_size}px / patch {args.patch_size}, r = "
        f"{args.mask_ratio}, batch {args.batch_size}, {args.steps_per_epoch} steps per epoch, "
        f"{args.epochs} epochs, torch threads {args.threads}, CPU fp32; TorchTrainer: 1 worker "
        "x 1 CPU on a 2-CPU local Ray; stream materialised before fit().",
        f"TorchTrainer / plain steady-state steps/s: median {statistics.median(ratios):.2f} over "
        f"{len(ratios)} paired run(s).",
        "Steady state = the loop's per-epoch images_per_s (first batch request to last step; "
        "no start-up, kNN or checkpoint), epochs 2..k.",
    ]
    table = _common.markdown_table(header, rows)
    if args.no_append:
        print(table + "\n" + "\n".join(notes))
        return
    _common.append_result("Trainer: TorchTrainer loop vs plain loop", table, notes, machine)


if __name__ == "__main__":
    main()
