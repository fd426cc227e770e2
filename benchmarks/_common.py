"""Shared helpers of the benchmark scripts (not a benchmark itself).

- `machine()`: nproc, CPU model, GPU (if any), load average, date: the header of every result;
- `append_result()`: appends a table, with the exact command and the machine, to the end of
  BENCHMARKS.md at the repository root;
- `make_jpeg_folder()`: a generated ImageNet-like JPEG ImageFolder under /tmp (sizes 400-500 px,
  smooth random content that JPEG compresses like photos, quality 90), cached between runs;
- `make_parquet_shards()`: the same images as Parquet shards via `micl.data.prepare`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "BENCHMARKS.md"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` without an installed package
    sys.path.append(str(ROOT))


# ----------------------------------------------------------------------------- reporting


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return cpu_info().get("model name") or platform.processor() or "unknown CPU"


def cpu_summary() -> str:
    """Model, family/model numbers, cores and the instruction sets that move CPU timings most:
    the same run can take twice as long on one 2-core machine as on another."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    has = {name: "yes" if flag in flags else "no"
           for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_bf16"))}
    return (f"{cpu_model()} (family {info.get('cpu family')} model {info.get('model')}), "
            f"{os.cpu_count()} cores, AVX-512 {has['AVX-512']}, AMX {has['AMX']}")


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no torch / broken driver: no GPU
        pass
    return None


def machine() -> str:
    """One line: date, nproc, CPU model, GPU, load average at the start of the run."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = gpu_name() or "no GPU"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"{now}; nproc={os.cpu_count()}, {cpu_model()}, {gpu}; "
            f"load average at start {load}; python {platform.python_version()}")


def command_line() -> str:
    """The command that produced a result, as it can be pasted back into a shell."""
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) \
        else sys.executable
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(shlex.quote(a) for a in [exe, script, *sys.argv[1:]])


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_result(title: str, table: str, notes: list[str] | None = None,
                  machine_line: str | None = None, path: Path = RESULTS) -> None:
    """Print the table and append it, with command, machine and date, to BENCHMARKS.md."""
    block = [f"### {title}", "", f"`{command_line()}`", "",
             f"Machine: {machine_line or machine()}", "", table, ""]
    for n in notes or []:
        block.append(f"- {n}")
    text = "\n".join(block).rstrip() + "\n\n"
    print(text)
    if not path.exists():
        path.write_text("# Benchmarks\n\n## Script output (appended by benchmarks/*.py)\n\n")
    with path.open("a") as f:
        f.write(text)


# ----------------------------------------------------------------------------- data


def _smooth_image(seed: int) -> tuple[np.ndarray, int]:
    """A random photo-like RGB image 400-500 px per side: a few octaves of upsampled noise
    (smooth areas and edges) plus a colour gradient and a little grain. Returns (array, class)."""
    from PIL import Image

    rng = np.random.default_rng([0xB3, seed])
    w, h = (int(v) for v in rng.integers(400, 501, 2))
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 0.5), (12, 0.3), (40, 0.15)):
        small = rng.random((cells, cells, 3), dtype=np.float32)
        up = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        acc += amp * np.asarray(up, np.float32) / 255
    dx, dy = rng.normal(size=2) / max(h, w)
    ramp = (np.arange(w, dtype=np.float32)[None, :] * dx
            + np.arange(h, dtype=np.float32)[:, None] * dy)
    acc += 0.3 * ramp[..., None] * rng.uniform(-1, 1, 3).astype(np.float32)
    acc += 0.02 * rng.standard_normal(acc.shape, dtype=np.float32)
    lo, hi = acc.min(), acc.max()
    img = ((acc - lo) / max(hi - lo, 1e-6) * 255 + 0.5).astype(np.uint8)
    return img, seed


def _write_chunk(job: tuple[str, list[int], int]) -> int:
    from PIL import Image

    root, seeds, classes = job
    for s in seeds:
        img, _ = _smooth_image(s)
        d = Path(root) / "train" / f"n{s % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{s:07d}.JPEG", format="JPEG", quality=90)
    return len(seeds)


def make_jpeg_folder(root: Path, num_images: int, classes: int = 100, workers: int | None = None,
                     log=print) -> Path:
    """`root/train/<class>/*.JPEG` with `num_images` images (kept and reused if complete)."""
    marker = root / "COMPLETE.json"
    want = {"num_images": num_images, "classes": classes, "version": 2}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    if root.exists():
        import shutil

        shutil.rmtree(root)
    log(f"[bench] generating {num_images} JPEGs under {root} ...")
    seeds = list(range(num_images))
    chunks = [seeds[i : i + 200] for i in range(0, num_images, 200)]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_write_chunk, [(str(root), c, classes) for c in chunks]))
    marker.write_text(json.dumps(want))
    return root


def make_parquet_shards(folder: Path, dst: Path, size: int = 256, rows_per_shard: int = 1000,
                        log=print) -> Path:
    """Parquet shards of `folder`'s train split via micl.data.prepare (cached)."""
    from micl.data.prepare import write_parquet_shards

    src_marker = json.loads((folder / "COMPLETE.json").read_text())
    marker = dst / "COMPLETE.json"
    want = {"src": src_marker, "size": size, "rows_per_shard": rows_per_shard}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return dst
    log(f"[bench] writing Parquet shards (size {size}) under {dst} ...")
    write_parquet_shards(str(folder), str(dst), size=size, splits=("train",),
                         rows_per_shard=rows_per_shard, workers=os.cpu_count() or 1,
                         overwrite=True, log=log)
    marker.write_text(json.dumps(want))
    return dst


def start_ray(attempts: int = 5, **kwargs) -> float:
    """`ray.init(address="local", **kwargs)` with retries: on a busy shared machine the raylet
    can miss Ray's fixed 30 s registration window. Returns the seconds of the successful try."""
    import time

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    for attempt in range(attempts):
        t = time.perf_counter()
        try:
            ray.init(address="local", **kwargs)
            return time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt + 1 == attempts:
                raise
            print(f"[bench] Ray start timed out (attempt {attempt + 1}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)
    raise AssertionError("unreachable")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process + its reaped children) from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / ticks


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds used so far by `root` (default: this process), its live
    descendants and every descendant already reaped. Linux only (reads /proc). Sampled at two
    moments, the difference is the CPU a loader and all its helper processes spent (DataLoader
    workers, or Ray's raylet, GCS and workers): a number that other users of a shared machine
    do not distort the way they distort wall-clock time."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def _synthetic_shard(job: tuple[str, int, int, int, int]) -> int:
    """One Parquet shard of `micl.data.sources.synthetic_images` (RGB, JPEG quality 95)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from micl.data.sources import synthetic_images

    path, first, count, size, classes = job
    ids = np.arange(first, first + count, dtype=np.int64)
    images, labels = synthetic_images(ids, size, 3, classes)
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": labels,
                             "sample_id": ids}), path)
    return count


def write_synthetic_parquet(dst: Path, num_train: int, num_val: int, size: int = 256,
                            classes: int = 10, rows_per_shard: int = 1000,
                            workers: int | None = None, log=print) -> Path:
    """`dst/{train,val}/part-*.parquet` + `dst/classes.json` in the layout of
    pipelines/prepare_data.py, of generated striped images (`synthetic_images`: the class sets
    the stripes' angle, so kNN and fine-tuning have something to learn); cached."""
    marker = dst / "COMPLETE.json"
    want = {"train": num_train, "val": num_val, "size": size, "classes": classes,
            "rows_per_shard": rows_per_shard}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return dst
    log(f"[bench] writing {num_train} + {num_val} synthetic {size}-px images as Parquet "
        f"under {dst} ...")
    jobs = []
    for split, n, offset in (("train", num_train, 0), ("val", num_val, 10**8)):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for old in (dst / split).glob("*.parquet"):
            old.unlink()
        jobs += [(str(dst / split / f"part-{k:05d}.parquet"), offset + s,
                  min(rows_per_shard, n - s), size, classes)
                 for k, s in enumerate(range(0, n, rows_per_shard))]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_synthetic_shard, jobs))
    (dst / "classes.json").write_text(json.dumps([f"class_{c}" for c in range(classes)]))
    marker.write_text(json.dumps(want))
    return dst
