"""ImageFolder tree -> Parquet shards that `data.source: parquet` reads (a one-off job).

Images are decoded once, shrunk so the shorter side is at most `size` (never enlarged) and
re-encoded as JPEG quality 95: far fewer, smaller files than ImageNet's 1.3 M JPEGs, which is
what makes object-store reads fast. Output:

    <dst>/classes.json                   ["class_a", "class_b", ...] (label order)
    <dst>/<split>/part-00000.parquet     image (binary), label int64, sample_id int64, path string

Labels and sample ids are those the `imagefolder` source gives for the same files, so a run on
the shards draws the same masks as a run on the folder. Rows are shuffled (fixed seed) across
shards so each shard mixes classes. Undecodable files are skipped, counted and listed.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from micl.data.sources import (
    DataError,
    image_folder_split,
    list_image_folder,
    resolve_path,
    stable_sample_id,
)
from micl.data.transforms import to_pil


@dataclass
class SplitReport:
    written: int = 0
    skipped: int = 0
    shards: int = 0
    bad_paths: list[str] = field(default_factory=list)  # relative paths (first 100)


def shrink_and_encode(data: bytes, size: int, quality: int = 95) -> bytes | None:
    """Encoded image -> JPEG bytes with the shorter side at most `size`; None if undecodable.
    Grayscale stays grayscale; every other mode becomes RGB."""
    img = to_pil(data, None, draft_size=size)
    if img is None:
        return None
    w, h = img.size
    if min(w, h) > size:
        s = size / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_shard(job: tuple) -> tuple[int, list[str]]:
    """Read, shrink and write one shard. Runs in a worker process: arguments are picklable."""
    src_fs, src_root, dst_fs, out_path, files, size, quality = job
    images, labels, ids, paths, bad = [], [], [], [], []
    for rel, label in files:
        try:
            with src_fs.open_input_file(posixpath.join(src_root, rel)) as f:
                data = f.readall()
        except OSError:
            data = b""
        encoded = shrink_and_encode(data, size, quality)
        if encoded is None:
            bad.append(rel)
            continue
        images.append(encoded)
        labels.append(label)
        ids.append(stable_sample_id(rel))
        paths.append(rel)
    if images:
        table = pa.table({
            "image": pa.array(images, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "sample_id": pa.array(ids, pa.int64()),
            "path": pa.array(paths, pa.string()),
        })
        pq.write_table(table, out_path, filesystem=dst_fs)
    return len(images), bad


def _split_root(fs: pafs.FileSystem, root: str, split: str, first_split: bool,
                splits: Sequence[str]) -> str:
    """The folder of `split` in the source tree by the imagefolder source's rule (a flat
    <src>/<class>/ tree is the first, train, split), so shards get the labels and sample ids
    a direct `data.source: imagefolder` read of the same tree gives."""
    split_root = image_folder_split(fs, root, split, first_split, splits)
    if split_root is None:
        raise DataError(f"data error: {posixpath.join(root, split)}: no such split directory")
    return split_root


def _prepare_dst(fs: pafs.FileSystem, out_dir: str, overwrite: bool) -> None:
    info = fs.get_file_info(out_dir)
    if info.type == pafs.FileType.Directory:
        old = [i.path for i in fs.get_file_info(pafs.FileSelector(out_dir))
               if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
        if old and not overwrite:
            raise DataError(f"data error: {out_dir}: already holds {len(old)} Parquet shards "
                            "(pass overwrite=True / --overwrite to replace them)")
        for p in old:
            fs.delete_file(p)
    fs.create_dir(out_dir, recursive=True)


def write_parquet_shards(
    src: str, dst: str, size: int = 256, splits: Sequence[str] = ("train", "val"),
    rows_per_shard: int = 1000, quality: int = 95, workers: int = 1, seed: int = 0,
    overwrite: bool = False, log: Callable[[str], None] = print,
) -> dict[str, SplitReport]:
    """Convert the `splits` of the ImageFolder tree at `src` (local path or URI) into Parquet
    shards under `dst`; the first split's class folders define the labels of all splits.
    Returns a report per split. `workers` > 1 converts shards in that many processes."""
    if rows_per_shard < 1 or size < 1:
        raise DataError("data error: rows_per_shard and size must be >= 1")
    src_fs, src_root = resolve_path(src)
    if src_fs.get_file_info(src_root).type != pafs.FileType.Directory:
        raise DataError(f"data error: {src}: no such directory")
    dst_fs, dst_root = resolve_path(dst)
    classes: list[str] | None = None
    reports: dict[str, SplitReport] = {}
    for n_split, split in enumerate(splits):
        root = _split_root(src_fs, src_root, split, n_split == 0, splits)
        classes, files = list_image_folder(src_fs, root, classes)
        if not classes or not files:
            raise DataError(f"data error: {root}: no images in class folders")
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        out_dir = posixpath.join(dst_root, split)
        _prepare_dst(dst_fs, out_dir, overwrite)
        jobs = [(src_fs, root, dst_fs, posixpath.join(out_dir, f"part-{k:05d}.parquet"),
                 files[s : s + rows_per_shard], size, quality)
                for k, s in enumerate(range(0, len(files), rows_per_shard))]
        report = reports[split] = SplitReport()
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_write_shard, jobs))
        else:
            results = [_write_shard(j) for j in jobs]
        for written, bad in results:
            report.written += written
            report.shards += int(written > 0)
            report.skipped += len(bad)
            report.bad_paths.extend(bad[: 100 - len(report.bad_paths)])
        log(f"{split}: {report.written} images in {report.shards} shards under {out_dir}, "
            f"{report.skipped} undecodable files skipped"
            + (f" (e.g. {', '.join(report.bad_paths[:5])})" if report.skipped else ""))
        if report.written == 0:
            raise DataError(f"data error: {root}: none of its {len(files)} files could be decoded")
    with dst_fs.open_output_stream(posixpath.join(dst_root, "classes.json")) as f:
        f.write(json.dumps(classes, indent=2).encode("utf-8"))
    return reports

