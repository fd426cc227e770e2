"""Data sources -> `ray.data.Dataset` of raw samples, one `Source` class per `data.source`.

Every source gives the same columns:

- `image`: encoded image bytes (binary) or a raw uint8 array [H, W] / [H, W, C];
- `label`: int64 class index (classes are the sorted class-folder names of the train split);
- `sample_id`: int64, stable across runs and machines: the index for array sources, a 63-bit
  hash of the path relative to the split root for files, so masks drawn from it are reproducible;
- `path`: string, relative to the split root ("" for array sources).

Sources register themselves with `@source("name")` in `SOURCES`; everything that depends on
which source a config names (loading, sizes, class names, config checks, whether the stream can
fuse the read into its map task) asks the class from `source_for(cfg)`, so a new source is one
class here and no if-chain elsewhere.

Decoding happens later, in the stream (`micl.data.stream`), so that corrupt files reach our
decoder and are skipped and counted rather than crashing a reader.

A missing or empty source raises `DataError` (a `ConfigError`) with one line naming the path,
when the dataset is built: before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import RandomSeedConfig
from ray.data.datasource import FileShuffleConfig

from micl.config import Config, ConfigError
from micl.data.idx import FASHION_MNIST_DIR, DataError, read_fashion_mnist

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_EVAL_SPLIT_ALIASES = ("val", "test", "t10k", "validation")

# The synthetic set does not depend on run.seed: runs with different seeds see the same data,
# so their results stay comparable. Validation samples get ids far from the training ones.
SYNTHETIC_SEED = 0x5EED
SYNTHETIC_VAL_OFFSET = 1 << 40

_SUBSET_SEED = 0  # a capped subset of a folder is the same whatever run.seed is

# Read tasks per file source: blocks of map_batch_size files (so map batches are full),
# but no more than this many blocks (task overhead on ImageNet-sized folders).
_MAX_READ_BLOCKS = 4096




# ----------------------------------------------------------------------------- registry


class Source:
    """One kind of `data.source`. Stateless: every method takes the config, so the class (or an
    instance from `source_for`) can be used from any process without setup.

    `fuses_read`: the source's read blocks are already sized for the training map task (one
    Parquet shard, or map_batch_size image files), so the stream maps them whole and Ray fuses
    the read into the map task (no separate Read operator, no object-store hop). In-memory
    sources have big blocks and are re-batched to map_batch_size instead.
    """

    name: ClassVar[str] = "base"
    fuses_read: ClassVar[bool] = False

    @classmethod
    def load(cls, cfg: Config, split: str, cap: int | None) -> ray.data.Dataset:
        """The raw samples of `split`, at most `cap` of them (see `load_split`)."""
        raise NotImplementedError

    @classmethod
    def size(cls, cfg: Config, split: str, cap: int | None) -> int:
        """How many samples `load` gives. Counting the Dataset is cheap for in-memory sources;
        file sources override this to count from a listing or metadata instead."""
        return cls.load(cfg, split, cap).count()

    @classmethod
    def classes(cls, cfg: Config) -> list[str]:
        """Class names in label order."""
        raise NotImplementedError

    @classmethod
    def location(cls, cfg: Config) -> str:
        """Where the data comes from, as a user would name it: data.path by default."""
        return cfg.data.path or ""

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Config checks this source needs, at validation time (before any data is touched);
        raise ConfigError naming the field."""


SOURCES: dict[str, type[Source]] = {}

_S = TypeVar("_S", bound=type[Source])


def source(name: str) -> Callable[[_S], _S]:
    """Class decorator: `@source("parquet")` makes `data.source: parquet` select the class."""

    def add(cls: _S) -> _S:
        cls.name = name
        SOURCES[name] = cls
        return cls

    return add


def source_for(cfg: Config) -> Source:
    """The Source that cfg.data.source names; ConfigError naming data.source if there is none."""
    name = cfg.data.source
    if name not in SOURCES:
        raise ConfigError(f"config error: data.source = {name!r}: unknown source; "
                          f"choose one of {sorted(SOURCES)}")
    return SOURCES[name]()


def check_source(cfg: Config) -> None:
    """Config validation of the data source (called from `micl.driver.check`: the config does not
    know source names): the source exists and its own checks pass."""
    source_for(cfg).check(cfg)


def _require_path(cfg: Config) -> None:
    if not cfg.data.path:
        raise ConfigError(f"config error: data.path = {cfg.data.path!r}: "
                          f"required for data.source = {cfg.data.source}")


# ----------------------------------------------------------------------------- public API


def read_task_options(cfg: Config) -> dict[str, Any]:
    """Ray options of a split's read tasks: with data.node_labels, the label selector of the
    decode/mask tasks (micl.data.stream.data_task_options). The files are then read on the data
    node that decodes them, not on a GPU node and shipped, and the read fuses into the decode
    task again, as it does on one machine (Ray fuses tasks whose selectors agree)."""
    return {"label_selector": dict(cfg.data.node_labels)} if cfg.data.node_labels else {}


def load_split(cfg: Config, split: str, limit: int | None = None) -> ray.data.Dataset:
    """The raw samples of `split` (cfg.data.train_split or cfg.data.val_split) of cfg.data.source.

    Columns: image (binary or uint8 array), label int64, sample_id int64, path string.
    At most `limit` samples (default: cfg.data.limit_train for the train split, all for
    others), a fixed subset chosen before any file is read (kNN banks of ImageNet stay cheap).
    The train split comes in a new order each execution (each epoch), seeded by run.seed:
    file sources shuffle their file order, in-memory sources their block order
    (`epoch_block_order`); each training worker then re-mixes its batches within
    data.shuffle_buffer rows (`micl.train.mix_batches`).
    """
    return source_for(cfg).load(cfg, split, _cap(cfg, split, limit))


def split_size(cfg: Config, split: str, limit: int | None = None) -> int:
    """How many samples `load_split` gives (files, before any is found undecodable), from the
    listing or Parquet metadata: no image is read."""
    return source_for(cfg).size(cfg, split, _cap(cfg, split, limit))


def data_location(cfg: Config) -> str:
    """Where the data comes from, as a user would name it (MLflow's dataset source)."""
    return source_for(cfg).location(cfg)


def class_names(cfg: Config) -> list[str]:
    """Class names in label order (cheap: a directory listing or a small JSON file at most)."""
    return source_for(cfg).classes(cfg)


def _cap(cfg: Config, split: str, limit: int | None) -> int | None:
    """`limit`, or by default data.limit_train for the train split and no cap for the others."""
    return limit if limit is not None else cfg.data.limit_train if _is_train(cfg, split) else None


def stable_sample_id(relative_path: str) -> int:
    """A 63-bit id from a path relative to its split root; the same on every run and machine
    (Python's hash() is salted per process, so it would not do)."""
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resolve_path(path: str | None) -> tuple[pafs.FileSystem, str]:
    """A local path or a filesystem URI (s3://, gs://, ...) -> (pyarrow filesystem, path on it)."""
    if not path:
        raise DataError("data error: data.path is not set")
    try:
        if "://" not in path:
            return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
        fs, p = pafs.FileSystem.from_uri(path)
        return fs, p.rstrip("/")
    except Exception as e:  # noqa: BLE001 - bad scheme, no credentials, ...
        reason = " ".join(str(e).split())  # provider errors span lines; ours must not
        raise DataError(f"data error: {path}: cannot open filesystem ({reason})") from None


def is_hidden(relative_path: str) -> bool:
    """Files or folders starting with "." (.DS_Store, .ipynb_checkpoints, ...) are not data."""
    return any(part.startswith(".") for part in relative_path.split("/"))


# ----------------------------------------------------------------------------- ImageFolder trees
# Shared by the imagefolder source and micl.data.prepare, so that a tree gets the same splits,
# labels and sample ids whether it is read directly or converted to Parquet shards first.


def image_folder_split(fs: pafs.FileSystem, root: str, split: str, train: bool,
                       split_names: Iterable[str]) -> str | None:
    """The folder holding `split` of the ImageFolder tree at `root`: `<root>/<split>`, or, for
    the train split of a flat tree (class folders directly under `root`, none of `split_names`
    present as folders), `root` itself. None when the split has no folder."""
    split_root = posixpath.join(root, split)
    if _is_dir(fs, split_root):
        return split_root
    if train and not any(_is_dir(fs, posixpath.join(root, n)) for n in split_names):
        return root
    return None


def class_folders(fs: pafs.FileSystem, root: str) -> list[str]:
    """The class folders of a split root, sorted (their index is the label); hidden ones
    (.ipynb_checkpoints, ...) are not classes."""
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                  if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


def list_image_folder(fs: pafs.FileSystem, root: str, classes: list[str] | None = None
                      ) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and (relative path, label) of every non-hidden file below
    a class folder of `root`, sorted by path. Files directly in `root` are ignored.

    With `classes` given (the train split's), folders must be among them: a val split missing a
    class keeps the train split's labels.
    """
    found = class_folders(fs, root)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"data error: {root}: class folders {unknown[:5]} are not in the "
                            f"train split's {len(classes)} classes")
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = _relative(info.path, root)
        cls, sep, _ = rel.partition("/")
        if sep and cls in index and not is_hidden(rel):
            files.append((rel, index[cls]))
    files.sort()
    return classes, files


# ----------------------------------------------------------------------------- Fashion-MNIST


def from_arrays(images: np.ndarray, labels: np.ndarray, map_batch_size: int = 64
                ) -> ray.data.Dataset:
    """In-memory uint8 images [N, H, W(, C)] and labels [N] -> a Dataset with sample_id = index,
    split into enough blocks for the cluster's map tasks to run in parallel."""
    from ray.data.extensions import ArrowTensorArray

    n = len(images)
    if n == 0:
        raise DataError("data error: the array source is empty")
    table = pa.table({
        "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        "label": pa.array(labels.astype(np.int64)),
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array([""] * n, pa.string()),
    })
    rows = _array_rows_per_block(n, map_batch_size)
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, n, rows)])


def epoch_block_order(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    """`ds` with its blocks in a new random order each time it is executed (each epoch),
    reproducible from run.seed: what a file source's shuffled file order does, for a dataset
    held in memory (whose blocks would otherwise reach the trainer in one fixed order)."""
    return ds.randomize_block_order(
        seed=RandomSeedConfig(seed=cfg.run.seed, reseed_after_execution=True))


@source("fashion_mnist")
class FashionMNIST(Source):
    """Fashion-MNIST's IDX files under data.path (default: Debian's dataset-fashion-mnist),
    held in memory: train is the 60k file, val/test the 10k t10k file."""

    fuses_read = False

    @classmethod
    def load(cls, cfg: Config, split: str, cap: int | None) -> ray.data.Dataset:
        key = "train" if _is_train(cfg, split) else "test" if _is_eval(cfg, split) else None
        if key is None:
            raise DataError(f"data error: Fashion-MNIST has no split {split!r} "
                            "(use train, or val/test for the t10k files)")
        images, labels = read_fashion_mnist(cfg.data.path, key)
        if cap:  # the files are already in random order
            images, labels = images[:cap], labels[:cap]
        ds = from_arrays(images, labels, cfg.data.map_batch_size)
        return epoch_block_order(ds, cfg) if key == "train" else ds

    @classmethod
    def location(cls, cfg: Config) -> str:
        return cfg.data.path or FASHION_MNIST_DIR

    @classmethod
    def classes(cls, cfg: Config) -> list[str]:
        return list(FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- ImageFolder


@source("imagefolder")
class ImageFolder(Source):
    """`<path>/<split>/<class>/<image>` (or a flat `<path>/<class>/<image>` as the train split),
    local or on an object store; labels are the train split's sorted class folders."""

    fuses_read = True  # read blocks of map_batch_size files (_file_blocks)

    @classmethod
    def check(cls, cfg: Config) -> None:
        _require_path(cfg)

    @classmethod
    def load(cls, cfg: Config, split: str, cap: int | None) -> ray.data.Dataset:
        fs, root, classes, files = cls._files(cfg, split, cap)
        train = _is_train(cfg, split)
        paths = [posixpath.join(root, rel) for rel, _ in files]
        index = {c: i for i, c in enumerate(classes)}
        options = read_task_options(cfg)
        ds = ray.data.read_binary_files(
            paths, include_paths=True, filesystem=fs,
            override_num_blocks=_file_blocks(len(paths), cfg.data.map_batch_size),
            shuffle=FileShuffleConfig(seed=cfg.run.seed) if train else None,
            ray_remote_args=options,
        )
        return ds.map_batches(_FolderLabeler(root, index), batch_format="pyarrow",
                              batch_size=None, **options)

    @classmethod
    def size(cls, cfg: Config, split: str, cap: int | None) -> int:
        return len(cls._files(cfg, split, cap)[3])

    @classmethod
    def classes(cls, cfg: Config) -> list[str]:
        """The train split's sorted class folders: the label space of every split."""
        fs, root = cls._split_root(cfg, cfg.data.train_split)
        classes = class_folders(fs, root)
        if not classes:
            raise DataError(f"data error: {_uri_of(cfg, root)}: no class folders")
        return classes

    @classmethod
    def _split_root(cls, cfg: Config, split: str) -> tuple[pafs.FileSystem, str]:
        """The split's folder (see `image_folder_split`), after checking data.path exists."""
        fs, root = resolve_path(cfg.data.path)
        base = fs.get_file_info(root)
        if base.type == pafs.FileType.NotFound:
            raise DataError(f"data error: {cfg.data.path}: no such directory")
        if base.type != pafs.FileType.Directory:
            raise DataError(f"data error: {cfg.data.path}: not a directory")
        split_root = image_folder_split(fs, root, split, _is_train(cfg, split),
                                        (cfg.data.train_split, cfg.data.val_split))
        if split_root is None:
            raise DataError(f"data error: {_join_uri(cfg.data.path, split)}: "
                            "no such split directory")
        return fs, split_root

    @classmethod
    def _files(cls, cfg: Config, split: str, cap: int | None
               ) -> tuple[pafs.FileSystem, str, list[str], list[tuple[str, int]]]:
        """(filesystem, split root, classes, [(relative path, label)]) after the cap."""
        fs, root = cls._split_root(cfg, split)
        if _is_train(cfg, split):
            classes = None
        else:
            try:
                classes = cls.classes(cfg)
            except DataError:  # no train split at all: the val split stands on its own
                classes = None
        classes, files = list_image_folder(fs, root, classes)
        where = _uri_of(cfg, root)
        if not classes:
            raise DataError(f"data error: {where}: no class folders "
                            f"(expected {where}/<class>/<image>)")
        if not files:
            raise DataError(f"data error: {where}: no files in its {len(classes)} class folders")
        if cap and cap < len(files):
            # A fixed random subset, not the first classes of the sorted listing.
            order = np.random.default_rng(_SUBSET_SEED).permutation(len(files))
            keep = order[:cap]
            files = [files[i] for i in sorted(keep)]
        return fs, root, classes, files


class _FolderLabeler:
    """(bytes, absolute path) -> (image, label, sample_id, relative path): labels come from the
    class folder name, ids from the relative path, so no per-file table is shipped to tasks."""

    def __init__(self, root: str, index: dict[str, int]) -> None:
        self.root, self.index = root, index

    def __call__(self, batch: pa.Table) -> pa.Table:
        rel = [_relative(p, self.root) for p in batch.column("path").to_pylist()]
        return pa.table({
            "image": batch.column("bytes"),
            "label": pa.array([self.index[r.partition("/")[0]] for r in rel], pa.int64()),
            "sample_id": pa.array([stable_sample_id(r) for r in rel], pa.int64()),
            "path": pa.array(rel, pa.string()),
        })


# ----------------------------------------------------------------------------- Parquet


PARQUET_COLUMNS = ("image", "label", "sample_id")


@source("parquet")
class Parquet(Source):
    """`<path>/<split>/*.parquet` shards written by pipelines/prepare_data.py, with the class
    names in `<path>/classes.json`; local or on an object store."""

    fuses_read = True  # one read block per shard

    @classmethod
    def check(cls, cfg: Config) -> None:
        _require_path(cfg)

    @classmethod
    def load(cls, cfg: Config, split: str, cap: int | None) -> ray.data.Dataset:
        fs, files, columns = _parquet_files(cfg, split)
        train = _is_train(cfg, split)
        options = read_task_options(cfg)
        if cap:  # prepare_data.py shuffles rows across shards, so the first rows are a fair sample
            ds = _first_parquet_rows(fs, files, columns, cap, options)
        else:
            # One read task per shard: the training stream maps whole blocks, so Ray fuses the
            # read into the map task (no SplitBlocks operator, no object-store hop in between).
            ds = _read_parquet(files, fs, columns, override_num_blocks=len(files),
                               shuffle=FileShuffleConfig(seed=cfg.run.seed) if train else None,
                               ray_remote_args=options)
        if "path" not in columns:
            ds = ds.map_batches(_add_empty_path, batch_format="pyarrow", batch_size=None,
                                **options)
        return ds

    @classmethod
    def size(cls, cfg: Config, split: str, cap: int | None) -> int:
        """From the shards' footers: no row is read."""
        fs, files, _ = _parquet_files(cfg, split)
        rows = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)
        return min(rows, cap or rows)

    @classmethod
    def classes(cls, cfg: Config) -> list[str]:
        fs, root = resolve_path(cfg.data.path)
        info = fs.get_file_info(posixpath.join(root, "classes.json"))
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                return list(json.loads(f.read().decode("utf-8")))
        raise DataError(f"data error: {cfg.data.path}: no classes.json next to the Parquet splits")


def _parquet_files(cfg: Config, split: str) -> tuple[pafs.FileSystem, list[str], list[str]]:
    """(filesystem, shard paths, columns to read) of a split, checked."""
    fs, root = resolve_path(cfg.data.path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"data error: {cfg.data.path}: no such directory")
    split_root = posixpath.join(root, split)
    where = _join_uri(cfg.data.path, split)
    if fs.get_file_info(split_root).type != pafs.FileType.Directory:
        raise DataError(f"data error: {where}: no such split directory")
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(split_root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not is_hidden(_relative(i.path, split_root)))
    if not files:
        raise DataError(f"data error: {where}: no .parquet files")
    schema = pq.read_schema(files[0], filesystem=fs)
    missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"data error: {files[0]}: missing column(s) {missing} "
                        "(write shards with pipelines/prepare_data.py)")
    columns = [*PARQUET_COLUMNS, *(["path"] if "path" in schema.names else [])]
    return fs, files, columns


def _first_parquet_rows(fs: pafs.FileSystem, files: list[str], columns: list[str], n: int,
                        options: dict[str, Any]) -> ray.data.Dataset:
    """Exactly the first n rows in (sorted) file order, the same rows on every execution:
    whole files up to n, plus the head of the next file read by a single task (a limit over
    parallel reads would keep whichever rows arrive first)."""
    whole, total = [], 0
    for f in files:
        if total >= n:
            break
        rows = pq.read_metadata(f, filesystem=fs).num_rows
        if total + rows > n:
            rest = _read_parquet([f], fs, columns, override_num_blocks=1,
                                 ray_remote_args=options).limit(n - total)
            return _read_parquet(whole, fs, columns, ray_remote_args=options).union(rest) \
                if whole else rest
        whole.append(f)
        total += rows
    return _read_parquet(whole, fs, columns, ray_remote_args=options)


def _read_parquet(files: list[str], fs: pafs.FileSystem, columns: list[str], **kwargs: Any
                  ) -> ray.data.Dataset:
    """read_parquet with Ray's file-based (V1) Parquet reader. Ray 2.60's default V2 reader
    starts every execution with a file-listing task that cost 1-2 s warm and up to 15 s on a
    busy 2-core machine for three small shards (V1: 0.15 s); the stream re-executes its
    Dataset every epoch, so that start-up would be paid per epoch."""
    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False  # only read_parquet itself looks at this flag
    try:
        return ray.data.read_parquet(files, filesystem=fs, columns=columns, **kwargs)
    finally:
        ctx.use_datasource_v2 = previous


def _add_empty_path(batch: pa.Table) -> pa.Table:
    return batch.append_column("path", pa.array([""] * batch.num_rows, pa.string()))


# ----------------------------------------------------------------------------- synthetic


def _synthetic_angle_deg(c: int, n_classes: int) -> float:
    # Angles in [0, 90): a horizontal flip maps theta to -theta, which is no other class's angle.
    return 90.0 * c / n_classes


def synthetic_images(ids: np.ndarray, size: int, channels: int, n_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-dependent images: oriented stripes (the class sets the angle; random
    frequency and phase), a random soft blob, a class tint for RGB, and pixel noise.

    Returns uint8 [N, size, size] (1 channel) or [N, size, size, 3], and labels int64 [N].
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] in [0, 1)
    out = np.empty((len(ids), size, size, channels), np.uint8)
    labels = (ids % n_classes).astype(np.int64)
    for i, (sid, c) in enumerate(zip(ids, labels, strict=True)):
        rng = np.random.default_rng([SYNTHETIC_SEED, int(sid)])
        theta = math.radians(_synthetic_angle_deg(int(c), n_classes) + rng.normal(0, 2.0))
        freq, phase = rng.uniform(3.0, 5.0), rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta))
                         + phase)  # [S, S] in [-1, 1]
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12**2))
        img = 0.5 + 0.3 * stripes + 0.25 * rng.choice([-1.0, 1.0]) * blob  # [S, S]
        img = img[:, :, None] * _class_tint(int(c), n_classes, channels)  # [S, S, C]
        img += rng.normal(0, 0.06, img.shape)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return (out[..., 0] if channels == 1 else out), labels


def _class_tint(c: int, n_classes: int, channels: int) -> np.ndarray:
    if channels == 1:
        return np.ones(1, np.float32)
    hue = 2 * math.pi * (c / n_classes + np.array([0.0, 1 / 3, 2 / 3]))
    return (0.75 + 0.25 * np.cos(hue)).astype(np.float32)  # [3]


@source("synthetic")
class Synthetic(Source):
    """Generated striped images (`synthetic_images`), for tests and smoke runs without data:
    data.synthetic_size train samples, a quarter as many val samples, model.img_size pixels."""

    fuses_read = False

    @classmethod
    def _extent(cls, cfg: Config, split: str, cap: int | None) -> tuple[int, int]:
        """(samples, id offset) of a split."""
        d = cfg.data
        if _is_train(cfg, split):
            n, offset = d.synthetic_size, 0
        elif _is_eval(cfg, split):
            n, offset = max(d.synthetic_size // 4, d.synthetic_classes), SYNTHETIC_VAL_OFFSET
        else:
            raise DataError(f"data error: the synthetic source has no split {split!r}")
        n = min(n, cap or n)
        if n <= 0 or d.synthetic_classes <= 0:
            raise DataError(f"data error: synthetic source with {n} samples of "
                            f"{d.synthetic_classes} classes")
        return n, offset

    @classmethod
    def size(cls, cfg: Config, split: str, cap: int | None) -> int:
        """Known from the config: counting would generate every image (seconds per run)."""
        return cls._extent(cfg, split, cap)[0]

    @classmethod
    def load(cls, cfg: Config, split: str, cap: int | None) -> ray.data.Dataset:
        d = cfg.data
        n, offset = cls._extent(cfg, split, cap)
        size, chans, classes = cfg.model.img_size, cfg.model.in_chans, d.synthetic_classes
        if chans not in (1, 3):
            raise DataError(f"data error: synthetic images have 1 or 3 channels, not {chans}")

        def generate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ids = batch["id"].astype(np.int64) + offset
            images, labels = synthetic_images(ids, size, chans, classes)
            return {"image": images, "label": labels, "sample_id": ids,
                    "path": np.full(len(ids), "", dtype=object)}

        blocks = math.ceil(n / _array_rows_per_block(n, d.map_batch_size))
        ids = ray.data.range(n, override_num_blocks=blocks)
        if _is_train(cfg, split):  # the order of the ids, before any image is generated
            ids = epoch_block_order(ids, cfg)
        return ids.map_batches(generate, batch_format="numpy", batch_size=None,
                               **read_task_options(cfg))

    @classmethod
    def location(cls, cfg: Config) -> str:
        return f"synthetic://{cfg.data.synthetic_size}x{cfg.data.synthetic_classes}"

    @classmethod
    def classes(cls, cfg: Config) -> list[str]:
        n = cfg.data.synthetic_classes
        return [f"stripes_{_synthetic_angle_deg(c, n):g}deg" for c in range(n)]


# ----------------------------------------------------------------------------- helpers


def _is_train(cfg: Config, split: str) -> bool:
    return split == cfg.data.train_split or (split == "train" and split != cfg.data.val_split)


def _is_eval(cfg: Config, split: str) -> bool:
    return split == cfg.data.val_split or split in _EVAL_SPLIT_ALIASES


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _relative(path: str, root: str) -> str:
    """Path below `root`, with "/" separators (pyarrow paths always use "/")."""
    root = root.rstrip("/")
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return path.lstrip("/")


def _join_uri(base: str | None, *parts: str) -> str:
    return "/".join([(base or "").rstrip("/"), *parts])


def _uri_of(cfg: Config, path_on_fs: str) -> str:
    """Show paths as the user wrote them (with the s3:// scheme) in error messages."""
    base = cfg.data.path or ""
    if "://" in base:
        scheme = base.split("://", 1)[0]
        return f"{scheme}://{path_on_fs}"
    return path_on_fs


def _file_blocks(n: int, map_batch_size: int) -> int:
    """Read tasks for n files: map_batch_size files each (so map batches are full and small
    blocks stay in flight), or a multiple of it once that would exceed _MAX_READ_BLOCKS."""
    per = map_batch_size * math.ceil(n / (_MAX_READ_BLOCKS * map_batch_size))
    return max(1, math.ceil(n / per))


def _array_rows_per_block(n: int, map_batch_size: int) -> int:
    """In-memory sets: at most ~64 blocks (a few per CPU), each a multiple of map_batch_size."""
    return map_batch_size * max(1, math.ceil(n / (64 * map_batch_size)))
