"""The data stream: raw samples -> ready training/evaluation batches, inside Ray Data.

`train_stream` runs one `map_batches` that decodes, crops, flips and draws the method's patch
masks, so the CPUs of the whole cluster do that work and training workers receive uint8 images
plus int64 index arrays. Normalisation is left to the training device (`transforms.normalize`):
uint8 is 4x less data to move than float32.

Every random choice for a sample (crop, flip, masks, in that order) comes from
`sample_rng(run.seed, epoch, sample_id)`, so a sample's view in an epoch is the same whatever
the batching, the number of workers or the execution order.

The epoch is either a fixed int, or the name of an epoch clock (micl.data.clock) that the
training loop sets before iterating each epoch (the same Dataset object is re-executed every
epoch, so the epoch cannot be baked into it).

Undecodable rows are dropped and counted. With an epoch clock, each map batch that dropped rows
reports the count (and a few paths) to the clock, which the training loop reads after the
epoch: an exact count. For direct use with a fixed epoch, the `skipped` column holds, on the
first kept row of each map batch, how many rows that batch dropped (0 elsewhere), so summing
`skipped` over an epoch gives the epoch's count. A map batch in which every row is bad has no
row to carry its count: it emits nothing, and if it had at least `ALL_BAD_RAISE_ROWS` rows (and
data.max_bad_fraction < 1) it raises `DataError`, because that many bad files in a row means far
more than an acceptable fraction of the data is bad (file order is shuffled). Smaller all-bad
batches (a short tail block) go uncounted; comparing the summed count with
data.max_bad_fraction is the training loop's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from micl.config import Config
from micl.data.augment import RandAugment, strong_augment
from micl.data.clock import NAMESPACE, ClockRef, find_clock
from micl.data.masking import sample_rng
from micl.data.sources import DataError, read_task_options, source_for
from micl.data.transforms import (
    center_box,
    crop_resize_fast,
    mode_for,
    random_resized_crop_params,
    to_pil,
)

ALL_BAD_RAISE_ROWS = 16
_BICUBIC = Image.Resampling.BICUBIC
_CROP_RATIO = (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------- epoch clock


_CLOCK_HANDLES: dict[str, ClockRef] = {}  # per worker process: clock name -> its clock


def _clock_epoch(name: str) -> int:
    """The clock's epoch; the handle is looked up once per process and again only if the actor
    was replaced (e.g. a restarted training run created a new one under the same name)."""
    return int(_call_clock(name, "get"))


def _call_clock(name: str, method: str, *args: Any) -> Any:
    for attempt in range(2):
        handle = _CLOCK_HANDLES.get(name)
        if handle is None:
            try:
                handle = find_clock(name)
            except ValueError:
                raise DataError(f"data error: no epoch clock {name!r} in namespace "
                                f"{NAMESPACE!r}: call epoch_clock(name) before iterating "
                                "the stream") from None
            _CLOCK_HANDLES[name] = handle
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except ray.exceptions.RayActorError:
            _CLOCK_HANDLES.pop(name, None)
            if attempt:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- streams

Augment = Callable[[Image.Image, np.random.Generator], Image.Image]

# A view's augmentation after the crop and flip: "weak" adds nothing, "strong" is MACRL's
# photometric recipe, and a timm RandAugment string ("rand-m9-mstd0.5-inc1") is fine-tuning's.
# A method that needs a new kind of view adds one entry here.
AUGMENTATIONS: dict[str, Augment | None] = {
    "weak": None,
    "strong": strong_augment,
}


def make_augment(name: str, cfg: Config) -> Augment | None:
    if name in AUGMENTATIONS:
        return AUGMENTATIONS[name]
    if name.startswith("rand-"):
        return RandAugment(name, cfg.model.img_size, cfg.data.mean)
    raise ValueError(f"unknown augmentation {name!r}; known: {sorted(AUGMENTATIONS)} or a "
                     "timm RandAugment string such as 'rand-m9-mstd0.5-inc1'")

MaskSampler = Callable[[np.random.Generator], dict[str, np.ndarray]]


@dataclass(frozen=True)
class StreamSpec:
    """What a method needs from the stream (its `stream_spec`): the image columns with their
    augmentation, and the per-sample mask samplers (`micl.data.masking`), drawn in this order."""

    views: dict[str, str] = field(default_factory=lambda: {"image": "weak"})
    masks: Sequence[MaskSampler] = ()

    def draw_masks(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for sampler in self.masks:
            out.update(sampler(rng))
        return out


def data_task_options(cfg: Config) -> dict[str, Any]:
    """Ray options of the decode/mask tasks: their CPUs and, when data.node_labels is set,
    the label selector that keeps them on the data nodes, which the reads share
    (sources.read_task_options)."""
    return {"num_cpus": cfg.data.data_cpus, **read_task_options(cfg)}


def train_stream(ds: ray.data.Dataset, cfg: Config, epoch: int | str, spec: StreamSpec
                 ) -> ray.data.Dataset:
    """Pre-training batches from `load_split` rows.

    Columns: image uint8 [B, C, H, W] (C = model.in_chans, H = W = model.img_size), one more
    such column per extra view in `spec.views` (macrl: image_strong), label int64 [B],
    sample_id int64 [B], one int64 [B, k] array per mask of the spec (micl: view1, view2),
    skipped int64 [B] (see the module docstring). `epoch`: an int, or an epoch clock's name. Per
    sample, the views are drawn in column order, then the masks.
    """
    _check_shape_config(cfg)
    mapper = _TrainMapper(cfg, epoch, spec)
    # An ImageFolder's read blocks hold map_batch_size files, a Parquet read block one shard:
    # mapping whole blocks lets Ray fuse the read into this task (a fixed batch_size keeps
    # Read a separate operator, with its own tasks and an object-store hop).
    batch_size = None if source_for(cfg).fuses_read else cfg.data.map_batch_size
    return ds.map_batches(mapper, batch_size=batch_size, batch_format="numpy",
                          **data_task_options(cfg))


def label_subset(sample_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which samples a low-shot run keeps: bool [N], about `fraction` of them. The choice is a
    hash of (seed, sample_id), not a draw, so the subset is the same whatever the order,
    sharding or execution, and for one seed the 1% subset lies inside the 10% one."""
    if fraction >= 1:
        return np.ones(len(sample_ids), bool)
    with np.errstate(over="ignore"):  # splitmix64: wrapping uint64 arithmetic is the point
        x = np.asarray(sample_ids).astype(np.uint64)
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x < np.uint64(int(fraction * 2**64))


def subset_suffix(fraction: float) -> str:
    """Metric-name suffix of a low-shot result: "" for all labels, "_10pct", "_1pct"."""
    return "" if fraction >= 1 else f"_{fraction * 100:g}pct"


def keep_label_subset(ds: ray.data.Dataset, fraction: float, seed: int) -> ray.data.Dataset:
    """`load_split` rows restricted to `label_subset` (before decoding: a filter on ids)."""
    if fraction >= 1:
        return ds

    def keep(batch: pa.Table) -> pa.Table:
        ids = batch.column("sample_id").to_numpy()
        return batch.filter(pa.array(label_subset(ids, fraction, seed)))

    return ds.map_batches(keep, batch_format="pyarrow", batch_size=None)


def eval_stream(ds: ray.data.Dataset, cfg: Config, crop_pct: float = 1.0) -> ray.data.Dataset:
    """Evaluation batches: decode, shorter side to img_size / crop_pct, centre crop img_size;
    no randomness.

    Columns: image uint8 [B, C, H, W], label int64 [B], sample_id int64 [B]. Bad rows are
    dropped (not counted: the training stream reports them).
    """
    _check_shape_config(cfg)
    return ds.map_batches(_EvalMapper(cfg, crop_pct), batch_size=cfg.data.map_batch_size,
                          batch_format="numpy", **data_task_options(cfg))


def _check_shape_config(cfg: Config) -> None:
    if cfg.model.in_chans not in (1, 3):
        raise DataError(f"data error: model.in_chans = {cfg.model.in_chans}: the stream "
                        "produces 1 (grayscale) or 3 (RGB) channels")


class _TrainMapper:
    """The per-batch function of `train_stream` (an instance: runs as plain Ray tasks)."""

    def __init__(self, cfg: Config, epoch: int | str, spec: StreamSpec) -> None:
        if isinstance(epoch, np.integer):
            epoch = int(epoch)
        if isinstance(epoch, bool) or not isinstance(epoch, int | str):
            raise TypeError(f"epoch must be an int or an epoch clock's name, not {epoch!r}")
        self.cfg = cfg
        self.epoch = epoch
        self.spec = spec
        self.views = spec.views  # column -> "weak" | "strong" | "rand-..."
        self.augments = {col: make_augment(name, cfg) for col, name in spec.views.items()}
        self.seed = cfg.run.seed
        self.size = cfg.model.img_size
        self.channels = cfg.model.in_chans
        self.mode = mode_for(self.channels)
        self.scale = (cfg.data.crop_scale_min, cfg.data.crop_scale_max)
        self.hflip = cfg.data.hflip
        self.raise_if_all_bad = cfg.data.max_bad_fraction < 1
        # JPEG draft decoding may shrink a photo as long as the smallest crop (area fraction
        # crop_scale_min) still covers at least img_size pixels on a side.
        self.draft = math.ceil(self.size / math.sqrt(cfg.data.crop_scale_min))
        # Empty mask arrays of the right width, for batches that keep no row.
        self.empty_masks = {k: np.empty((0, len(v)), np.int64) for k, v in
                            spec.draw_masks(np.random.default_rng(0)).items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self.epoch if isinstance(self.epoch, int) else _clock_epoch(self.epoch)
        images, sample_ids = batch["image"], batch["sample_id"]
        n = len(sample_ids)
        outs = {col: np.empty((n, self.channels, self.size, self.size), np.uint8)  # [B, C, H, W]
                for col in self.views}
        keep = np.zeros(n, bool)
        masks: dict[str, list[np.ndarray]] = {k: [] for k in self.empty_masks}
        kept = 0
        for i in range(n):
            img = to_pil(images[i], self.mode, self.draft)
            if img is None:
                continue
            rng = sample_rng(self.seed, epoch, int(sample_ids[i]))
            for col in self.views:
                outs[col][kept] = self._view(img, self.augments[col], rng)
            keep[i] = True
            kept += 1
            for k, v in self.spec.draw_masks(rng).items():
                masks[k].append(v)
        bad = n - kept
        if kept == 0 and n >= ALL_BAD_RAISE_ROWS and self.raise_if_all_bad:
            raise DataError(f"data error: all {n} rows of a map batch are undecodable "
                            f"(e.g. {_first_path(batch)!r}): far more than "
                            f"data.max_bad_fraction = {self.cfg.data.max_bad_fraction} of the "
                            "data is bad")
        skipped = np.zeros(kept, np.int64)
        if kept:
            skipped[0] = bad
        if bad and isinstance(self.epoch, str):  # waited for, so the count is in before the
            paths = batch.get("path")            # epoch's last batch reaches the trainer
            bad_paths = [] if paths is None else [str(p) for p, k in zip(paths, keep, strict=True)
                                              if not k]
            _call_clock(self.epoch, "add_skipped", epoch, bad, bad_paths[:5])
        result = {
            **{col: out[:kept] for col, out in outs.items()},
            "label": np.asarray(batch["label"], np.int64)[keep],
            "sample_id": np.asarray(sample_ids, np.int64)[keep],
            "skipped": skipped,
        }
        for k, rows in masks.items():
            result[k] = np.stack(rows).astype(np.int64, copy=False) if rows else self.empty_masks[k]
        return result

    def _view(self, img: Image.Image, augment: Augment | None, rng: np.random.Generator
              ) -> np.ndarray:
        """One augmented view: RandomResizedCrop, flip, then the view's augmentation (e.g.
        "strong": colour jitter, grayscale and blur). Returns uint8 [C, H, W]."""
        w, h = img.size
        box = random_resized_crop_params(h, w, self.scale, _CROP_RATIO, rng)
        a = crop_resize_fast(img, box, self.size)  # [H, W(, C)]
        if self.hflip and rng.random() < 0.5:
            a = a[:, ::-1]
        if augment is not None:
            a = np.asarray(augment(Image.fromarray(np.ascontiguousarray(a)), rng))
        return a.transpose(2, 0, 1) if a.ndim == 3 else a  # [C, H, W]


class _EvalMapper:
    """The per-batch function of `eval_stream`."""

    def __init__(self, cfg: Config, crop_pct: float = 1.0) -> None:
        self.size = cfg.model.img_size
        self.channels = cfg.model.in_chans
        self.mode = mode_for(self.channels)
        self.crop_pct = crop_pct
        self.draft = math.ceil(self.size / crop_pct)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        out = np.empty((n, self.channels, self.size, self.size), np.uint8)  # [B, C, H, W]
        keep = np.zeros(n, bool)
        j = 0
        for i in range(n):
            img = to_pil(images[i], self.mode, self.draft)
            if img is None:
                continue
            w, h = img.size
            box = center_box(h, w, self.crop_pct)
            a = np.asarray(img.resize((self.size, self.size), _BICUBIC, box=box))
            out[j] = a.transpose(2, 0, 1) if a.ndim == 3 else a
            keep[i] = True
            j += 1
        return {
            "image": out[:j],
            "label": np.asarray(batch["label"], np.int64)[keep],
            "sample_id": np.asarray(batch["sample_id"], np.int64)[keep],
        }


def _first_path(batch: dict[str, np.ndarray]) -> str:
    paths = batch.get("path")
    return str(paths[0]) if paths is not None and len(paths) else "?"
