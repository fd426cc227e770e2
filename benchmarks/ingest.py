"""Ingest throughput: this project's Ray Data stream vs the reference torch DataLoader.

Run (from the repository root; ~10 min on 2 cores with the defaults' data already generated):

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/ingest.py                   # 20,000 images
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/ingest.py --num-images 2000 --epochs 3
    # before/after a code change: a copy of the old micl/ (e.g. `git archive HEAD micl | tar -x
    # -C /tmp/micl-head`) runs as a second Ray variant in the same run
    .venv/bin/python benchmarks/ingest.py --variant head:code=/tmp/micl-head --variant now:

What it measures, on the same generated data and the same number of CPU processes (--cpus):

- the reference loader (MAE/MiCL reference code): `torch.utils.data.DataLoader(num_workers=
  --cpus, shuffle, drop_last)` over `torchvision.datasets.ImageFolder` with RandomResizedCrop(224,
  scale=(0.2, 1), bicubic) + RandomHorizontalFlip + ToTensor + Normalize; for the Parquet shards
  the same transforms over a map-style Dataset holding the shards' image column in memory;
- this project's stream: `load_split` + `train_stream` (read -> decode -> crop/flip -> MiCL masks
  for ViT-L/16 at r = 0.9) on a local Ray cluster started with `num_cpus=--cpus`, consumed with
  `iter_torch_batches(batch_size, drop_last=True)` like the training loop, the epoch set through
  an EpochClock like the trainer does.

Data: an ImageFolder of --num-images generated JPEGs (400-500 px, quality 90, 100 classes) under
--data-root (default /tmp/micl-bench; kept and reused), and Parquet shards of it written by
`micl.data.prepare.write_parquet_shards(size=256)`.

Each measurement runs in a fresh child process (Ray's cluster is started and stopped inside it,
so its daemons are not running while the DataLoader is timed) and the loaders alternate
(A B A B ... with --repeats) because the machine is shared: compare ratios, not absolute numbers.
Per measurement: the first pass (from building the dataset/loader to the last batch; `ray.init`
is reported separately) and steady state (epochs 2..k: images / seconds summed over them).
The Ray rows come with a summary of `Dataset.stats()` of the last epoch (per-operator wall and
CPU time, and how long the consumer waited), written next to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

IMG = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- reference loader


def _reference_transform():
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(IMG, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


class ParquetImages:
    """Map-style torch Dataset over Parquet shards (image bytes + label), held in memory as one
    Arrow binary column: forked DataLoader workers share it copy-on-write."""

    def __init__(self, split_dir: Path, transform) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted(split_dir.glob("*.parquet"))
        table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in files])
        self.images = table.column("image").combine_chunks()
        self.labels = table.column("label").to_numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(self.images[i].as_py())).convert("RGB")
        return self.transform(img), int(self.labels[i])


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    epochs: list[tuple[int, float, float]] = []
    t0, c0 = time.perf_counter(), _common.tree_cpu_seconds()
    transform = _reference_transform()
    if spec["format"] == "jpeg":
        dataset = ImageFolder(str(Path(spec["path"]) / "train"), transform=transform)
    else:
        dataset = ParquetImages(Path(spec["path"]) / "train", transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=spec["batch_size"], shuffle=True, drop_last=True,
        num_workers=spec["cpus"], persistent_workers=spec.get("persistent_workers", False))
    first_batch_s = None
    for _ in range(spec["epochs"]):
        n = 0
        for images, _labels in loader:
            n += images.shape[0]
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), _common.tree_cpu_seconds()
        epochs.append((n, t1 - t0, c1 - c0))
        t0, c0 = t1, c1
    return {"epochs": epochs, "first_batch_s": first_batch_s}


# ----------------------------------------------------------------------------- Ray stream


def _ray_config(spec: dict[str, Any]):
    from micl.config import Config

    cfg = Config()
    cfg.data.source = "imagefolder" if spec["format"] == "jpeg" else "parquet"
    cfg.data.path = spec["path"]
    cfg.model.name, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = \
        "vit_large", IMG, 16, 3
    cfg.method.name = "micl"
    cfg.method.args["mask_ratio"] = spec.get("mask_ratio", 0.9)
    cfg.data.batch_size = spec["batch_size"]
    cfg.data.map_batch_size = int(spec.get("map_batch_size", 512))
    cfg.data.data_cpus = float(spec.get("data_cpus", 1.0))
    from micl.driver import check

    return check(cfg)  # generic fields, data source, method (fills in MiCL's defaults)


def run_ray(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    pythonpath = os.pathsep.join(p for p in (spec.get("code"), str(_common.ROOT)) if p)
    init_s = _common.start_ray(num_cpus=spec["cpus"], include_dashboard=False,
                               log_to_driver=False, object_store_memory=2 * 2**30,
                               runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    import micl.data.stream as stream_mod
    from micl.data.clock import epoch_clock, new_clock_name
    from micl.data.sources import load_split
    from micl.data.stream import train_stream
    from micl.objectives import stream_spec

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if "preserve_order" in spec:
        ctx.execution_options.preserve_order = bool(int(spec["preserve_order"]))
    if "max_block_mb" in spec:
        ctx.target_max_block_size = int(float(spec["max_block_mb"]) * 2**20)

    epochs: list[tuple[int, float, float]] = []
    t0, c0 = time.perf_counter(), _common.tree_cpu_seconds()
    cfg = _ray_config(spec)
    clock_name = new_clock_name("bench")
    clock = epoch_clock(clock_name)
    ds = train_stream(load_split(cfg, "train"), cfg, clock_name, stream_spec(cfg))
    if spec.get("consume") == "split":  # what ray.train.DataConfig does for one worker
        it_src = ds.streaming_split(1, equal=True)[0]
    else:
        it_src = ds
    first_batch_s = None
    for epoch in range(spec["epochs"]):
        ray.get(clock.set.remote(epoch))
        n = 0
        for batch in it_src.iter_torch_batches(batch_size=spec["batch_size"], drop_last=True,
                                               prefetch_batches=2):
            n += batch["image"].shape[0]
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), _common.tree_cpu_seconds()
        epochs.append((n, t1 - t0, c1 - c0))
        t0, c0 = t1, c1
    stats = it_src.stats() if hasattr(it_src, "stats") else ds.stats()
    ray.shutdown()
    return {"epochs": epochs, "init_s": init_s, "stats": stats, "first_batch_s": first_batch_s,
            "micl_file": stream_mod.__file__}


# ----------------------------------------------------------------------------- driver


def summarize_stats(stats: str) -> list[str]:
    """The lines of Dataset.stats() that say where time went: operator headers, their remote
    wall/CPU time and output rows, and the iterator's blocked time."""
    keep = ("Operator ", "* Remote wall time", "* Remote cpu time", "* Output num rows",
            "* Total time user thread is blocked", "* Total time in user code",
            "* Total execution time", "* Batch iteration time", "* In batch creation",
            "* In batch formatting", "* Total time overall", "* Tasks per node",
            "* In ray.get", "Dataset iterator time breakdown", "* Total time spent waiting")
    out = []
    for line in stats.splitlines():
        s = line.strip()
        if any(s.startswith(k) for k in keep):
            out.append(s)
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:key=value,key=value' -> (name, {key: value})."""
    name, _, rest = text.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    allowed = {"code", "map_batch_size", "data_cpus", "preserve_order", "max_block_mb",
               "consume", "mask_ratio"}
    bad = set(opts) - allowed
    if bad:
        raise SystemExit(f"--variant {text!r}: unknown keys {sorted(bad)}; "
                         f"known: {sorted(allowed)}")
    return name, opts


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh interpreter (PYTHONPATH puts --variant code=DIR first)."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if spec.get("code"):
        env["PYTHONPATH"] = os.pathsep.join([spec["code"], env.get("PYTHONPATH", "")])
    for attempt in range(3):  # a busy shared machine can time out Ray's start: try again
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                             capture_output=True, text=True)
        if out.returncode == 0 or "timed out during startup" not in out.stderr:
            break
        print(f"[bench] Ray start timed out (attempt {attempt + 1}); retrying", flush=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-5000:] + out.stderr[-5000:])
        raise SystemExit(f"child failed: {spec}")
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def rates(result: dict[str, Any]) -> tuple[float, float, float, float]:
    """(first-pass seconds, first-pass img/s, steady-state img/s over epochs 2..k, steady CPU
    milliseconds per image summed over every process of the loader)."""
    (n1, s1, _), rest = result["epochs"][0], result["epochs"][1:]
    if not rest:
        return s1, n1 / s1, float("nan"), float("nan")
    n = sum(e[0] for e in rest)
    return s1, n1 / s1, n / sum(e[1] for e in rest), 1e3 * sum(e[2] for e in rest) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=3, help="passes per measurement (>= 2)")
    p.add_argument("--cpus", type=int, default=2, help="DataLoader workers = Ray num_cpus")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--formats", nargs="+", default=["jpeg", "parquet"],
                   choices=["jpeg", "parquet"])
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats per format")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...",
                   help="a Ray configuration to measure (repeatable). Keys: code (a directory "
                   "holding another micl/ package), map_batch_size, data_cpus, preserve_order "
                   "(0/1), max_block_mb, consume (iter | split), mask_ratio. Default: one "
                   "variant 'micl' with map_batch_size 512 (configs/imagenet_vitl16.yaml)")
    p.add_argument("--no-reference", action="store_true", help="skip the DataLoader")
    p.add_argument("--data-root", type=Path, default=Path("/tmp/micl-bench"))
    p.add_argument("--title", default=None)
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        spec = json.loads(args.child)
        result = (run_torch if spec["loader"] == "torch" else run_ray)(spec)
        print("RESULT " + json.dumps(result))
        return

    machine = _common.machine()
    variants = [parse_variant(v) for v in args.variant] or [("micl", {})]
    folder = _common.make_jpeg_folder(args.data_root / f"jpeg-{args.num_images}", args.num_images)
    shards = _common.make_parquet_shards(folder, args.data_root / f"parquet-{args.num_images}")
    paths = {"jpeg": str(folder), "parquet": str(shards)}

    rows: list[list[object]] = []
    notes: list[str] = []
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for fmt in args.formats:
        for rep in range(args.repeats):
            order = ([] if args.no_reference else [("torch", "DataLoader", {})]) + \
                [("ray", name, opts) for name, opts in variants]
            if rep % 2:
                order.reverse()
            results: dict[str, tuple[float, float, float]] = {}
            for loader, name, opts in order:
                spec = {"loader": loader, "format": fmt, "path": paths[fmt],
                        "cpus": args.cpus, "epochs": args.epochs,
                        "batch_size": args.batch_size, **opts}
                print(f"[bench] {fmt} {name} (repeat {rep + 1}) ...", flush=True)
                res = run_child(spec)
                first_s, first_rate, steady, cpu_ms = rates(res)
                results[name] = (first_s, first_rate, steady, 1 / cpu_ms)
                print(f"[bench]   first pass {first_s:.1f} s ({first_rate:.0f} img/s), "
                      f"steady {steady:.0f} img/s, {cpu_ms:.2f} CPU ms/img", flush=True)
                init = f"{res['init_s']:.1f}" if "init_s" in res else "-"
                rows.append([fmt, name, rep + 1, init, res["first_batch_s"], first_s,
                             first_rate, steady,
                             steady / args.cpus, cpu_ms, 1e3 / cpu_ms, "", "", ""])
                if loader == "ray":
                    summary = summarize_stats(res["stats"])
                    notes.append(f"Dataset.stats() of the last epoch, {fmt} / {name} / repeat "
                                 f"{rep + 1}:<br>" + "<br>".join(summary))
                    (args.data_root / f"stats-{fmt}-{name}-{rep + 1}.txt").write_text(res["stats"])
            if "DataLoader" in results:
                ref = results["DataLoader"]
                for row in rows[-len(order):]:
                    if row[1] != "DataLoader":
                        mine = results[row[1]]
                        row[11] = mine[1] / ref[1]
                        row[12] = mine[2] / ref[2]
                        row[13] = mine[3] / ref[3]
                        ratios.setdefault((fmt, row[1]), []).append(
                            (row[11], row[12], row[13]))

    header = ["data", "loader", "rep", "ray.init s", "1st batch s", "1st pass s",
              "1st pass img/s",
              "steady img/s", "steady img/s/core", "CPU ms/img", "img/s per busy core",
              "ratio 1st", "ratio steady", "ratio CPU cost"]
    table = _common.markdown_table(header, rows)
    summary = [f"{fmt} / {name}: stream / DataLoader steady-state ratio median "
               f"{statistics.median(r[1] for r in rs):.2f} (first pass "
               f"{statistics.median(r[0] for r in rs):.2f}; per CPU-second "
               f"{statistics.median(r[2] for r in rs):.2f}) over {len(rs)} paired run(s)"
               for (fmt, name), rs in ratios.items()]
    variant_text = "; ".join(f"{n}: {o or 'defaults'}" for n, o in variants)
    head_notes = [
        f"{args.num_images} generated JPEGs (400-500 px, q90) / Parquet shards (size 256); "
        f"{args.cpus} CPUs each (DataLoader num_workers={args.cpus}, Ray num_cpus={args.cpus}); "
        f"batch {args.batch_size}, {args.epochs} passes; steady = epochs 2..{args.epochs}. "
        f"Ray variants: {variant_text}.",
        "1st batch s / 1st pass s: from building the dataset or loader (ray.init excluded, "
        "its own column) to the first batch / the end of the first pass.",
        "CPU ms/img: user+system CPU of every process of the loader (DataLoader workers and "
        "main; Ray driver, raylet, GCS, workers) per image in the steady epochs, from /proc; "
        "img/s per busy core = 1000 / that. Ratio CPU cost = DataLoader CPU ms/img / the "
        "stream's: what the wall-clock ratio would be if both kept their CPUs fully busy, which "
        "a machine shared with other jobs does not let them do.",
        *summary,
    ]
    if args.no_append:
        print(table)
        print("\n".join(head_notes + notes))
        return
    _common.append_result(args.title or "Ingest: Ray Data stream vs torch DataLoader", table,
                          head_notes + notes, machine)


if __name__ == "__main__":
    main()
