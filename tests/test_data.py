"""The data layer: decoding, crops, sources and the Ray Data streams, on real files and real Ray."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from helpers import BAD_FILES, make_image_folder
from PIL import Image

from micl.config import Config, ConfigError
from micl.data.clock import epoch_clock, new_clock_name
from micl.data.idx import read_fashion_mnist, read_idx
from micl.data.masking import patches_per_view
from micl.data.prepare import write_parquet_shards
from micl.data.sources import (
    FASHION_MNIST_DIR,
    DataError,
    class_names,
    load_split,
    split_size,
    stable_sample_id,
    synthetic_images,
)
from micl.data.stream import eval_stream, train_stream
from micl.data.transforms import (
    center_resize,
    crop_resize,
    crop_resize_fast,
    decode_image,
    normalize,
    random_resized_crop_params,
)
from micl.objectives import stream_spec
from micl.train import mix_batches

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def folder_cfg(path, img_size: int = 32, in_chans: int = 3, source: str = "imagefolder"
               ) -> Config:
    cfg = Config()
    cfg.data.source, cfg.data.path = source, str(path)
    cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = img_size, 4, in_chans
    cfg.method.args["mask_ratio"] = 0.75  # 64 patches -> 16 kept -> 8 per view
    return cfg.validate()


def by_id(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by sample_id: execution order is not deterministic, contents are."""
    order = np.argsort(batch["sample_id"])
    return {k: v[order] for k, v in batch.items()}


def collect(ds: ray.data.Dataset) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageNet-style tree: 3 classes x 4 good images + 3 bad files, train and val."""
    root = tmp_path_factory.mktemp("imagefolder")
    info = make_image_folder(root, n_per_class=4, classes=("dog", "cat", "fish"), size=24)
    make_image_folder(root, n_per_class=2, classes=("cat", "dog", "fish"), size=20,
                      bad_files=False, split="val")
    return info


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_image_converts_every_mode(channels):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    gray16 = np.full((10, 12), 32768, np.uint16)  # mid-grey in 16 bits
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    cases = {
        "cmyk_jpeg": encode(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), "JPEG"),
        "gray_jpeg": encode(Image.new("L", (12, 10), 90), "JPEG"),
        "i16_png": encode(Image.fromarray(gray16), "PNG"),
        "rgba_png": encode(Image.fromarray(np.dstack([rgb, np.full((10, 12), 7, np.uint8)])),
                           "PNG"),
        "la_png": encode(Image.new("LA", (12, 10), (90, 128)), "PNG"),
        "palette_png": encode(palette, "PNG", transparency=0),
        "bilevel_png": encode(Image.new("1", (12, 10), 1), "PNG"),
        "rgb_webp_or_bmp": encode(Image.fromarray(rgb), "BMP"),
    }
    for name, data in cases.items():
        out = decode_image(data, channels)
        assert out is not None, name
        assert out.dtype == np.uint8, name
        assert out.shape == ((10, 12) if channels == 1 else (10, 12, 3)), (name, out.shape)
    # 16-bit is scaled to 8 bits, not clipped to white.
    assert abs(int(decode_image(cases["i16_png"], 1).mean()) - 128) <= 1
    # CMYK (0, 255, 255, 0) is red.
    red = decode_image(cases["cmyk_jpeg"], 3)
    assert red[..., 0].mean() > 200 and red[..., 1:].mean() < 60


@pytest.mark.parametrize("bad", [b"", b"hello, not an image", b"\xff\xd8\xff\xe0" + b"\0" * 50,
                                 None, 12, np.zeros(0, np.uint8)])
def test_decode_image_returns_none_for_garbage(bad):
    assert decode_image(bad, 3) is None


def test_decode_image_truncated_jpeg_and_arrays():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                    dtype=np.uint8)), "JPEG")
    assert decode_image(data[: len(data) // 2], 3) is None
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    rgb = decode_image(gray, 3)
    assert rgb.shape == (4, 5, 3) and (rgb == gray[..., None]).all()
    assert (decode_image(gray[..., None], 1) == gray).all()
    assert decode_image(np.full((4, 5, 3), 77, np.uint8), 1).shape == (4, 5)


def test_jpeg_draft_keeps_enough_pixels():
    data = encode(Image.new("RGB", (800, 600), (10, 200, 30)), "JPEG")
    small = decode_image(data, 3, draft_size=100)
    assert 100 <= min(small.shape[:2]) < 600  # decoded at a reduced scale, never below 100
    assert decode_image(data, 3).shape == (600, 800, 3)


def test_random_resized_crop_params_distribution():
    rng = np.random.default_rng(0)
    h, w, scale, ratio = 60, 80, (0.2, 1.0), (3 / 4, 4 / 3)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_params(h, w, scale, ratio, rng)
        cw, ch = right - left, bottom - top
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert 0.15 <= cw * ch / (h * w) <= 1.0
        assert 0.7 <= cw / ch <= 1.4
    # No attempt can fit a 0.9-area crop with ratio <= 4/3 in a 10 x 1000 strip: centre fallback.
    left, top, right, bottom = random_resized_crop_params(10, 1000, (0.9, 1.0), ratio, rng)
    assert (top, bottom) == (0, 10) and right - left == 13 and left == (1000 - 13) // 2


def test_crop_resize_center_resize_and_normalize():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # a white centre square of side 20
    assert crop_resize(img, (0, 0, 20, 20), 8).shape == (8, 8, 3)
    centre = center_resize(img, 10)
    assert centre.shape == (10, 10, 3) and centre[:, 1:-1].min() == 255  # edges: bicubic taps
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert y.dtype == torch.float32 and torch.allclose(y, torch.full_like(y, 2.0))
    # One channel with three statistics uses their average.
    y1 = normalize(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), [0.2, 0.4, 0.6], [0.1, 0.2, 0.3])
    assert torch.allclose(y1, torch.full_like(y1, -0.4 / 0.2))


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_resize_fast_matches_pil(channels):
    # The stream's torch resize must give the reference loader's pixels (PIL bicubic, i.e.
    # torchvision's RandomResizedCrop), for photo-sized crops and for small ones alike.
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).resize(
        (480, 400), Image.Resampling.BICUBIC)).astype(int)
    smooth = np.clip(smooth + rng.integers(-30, 30, smooth.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(smooth if channels == 3 else smooth[..., 0])
    for box in [(13, 20, 313, 390), (0, 0, 480, 400), (100, 50, 150, 90), (5, 5, 40, 33)]:
        fast, ref = crop_resize_fast(img, box, 224), crop_resize(img, box, 224)
        assert fast.shape == ref.shape and fast.dtype == np.uint8
        diff = np.abs(fast.astype(int) - ref.astype(int))
        # Rounding of the intermediate (horizontal pass) differs: a few levels at sharp edges.
        assert diff.mean() < 0.05 and np.quantile(diff, 0.99) <= 1 and diff.max() <= 8, box


def test_read_idx_and_stable_ids(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(header + arr.tobytes())
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as f:
        f.write(header + arr.tobytes())
    assert (read_idx(str(tmp_path / "a-idx3-ubyte")) == arr).all()
    assert (read_idx(str(tmp_path / "a-idx3-ubyte.gz")) == arr).all()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad"):
        read_idx(str(tmp_path / "bad"))
    sid = stable_sample_id("n01440764/n01440764_10026.JPEG")
    assert sid == stable_sample_id("n01440764/n01440764_10026.JPEG") and 0 <= sid < 2**63
    assert sid != stable_sample_id("n01440764/n01440764_10027.JPEG")


def test_synthetic_images_are_deterministic_and_separable():
    ids = np.arange(400)
    a, labels = synthetic_images(ids, 28, 1, 4)
    b, _ = synthetic_images(ids, 28, 1, 4)
    assert a.shape == (400, 28, 28) and a.dtype == np.uint8 and (a == b).all()
    assert synthetic_images(ids[:3], 16, 3, 4)[0].shape == (3, 16, 16, 3)
    # Nearest class centroid on Fourier magnitudes (phase-free) tells the classes apart.
    feats = np.abs(np.fft.fft2(a.astype(np.float32) - a.mean((1, 2), keepdims=True)))
    feats = feats.reshape(len(a), -1)
    train, test = slice(0, 200), slice(200, 400)
    centroids = np.stack([feats[train][labels[train] == c].mean(0) for c in range(4)])
    dist = ((feats[test][:, None] - centroids[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == labels[test]).mean()
    assert accuracy > 0.9, accuracy


# ----------------------------------------------------------------------------- sources


def test_imagefolder_labels_sorted_and_ids_stable(ray_local, folder):
    cfg = folder_cfg(folder["root"])
    assert class_names(cfg) == ["cat", "dog", "fish"]
    first = load_split(cfg, "train").take_all()
    second = load_split(cfg, "train").take_all()
    assert len(first) == folder["good"] + BAD_FILES  # the hidden .DS_Store is not listed
    ids = {r["path"]: (r["label"], r["sample_id"]) for r in first}
    assert ids == {r["path"]: (r["label"], r["sample_id"]) for r in second}
    for path, (label, sid) in ids.items():
        assert label == ["cat", "dog", "fish"].index(path.split("/")[0])
        assert sid == stable_sample_id(path)
    val = load_split(cfg, "val").take_all()
    assert len(val) == 6 and {r["label"] for r in val} == {0, 1, 2}
    assert isinstance(first[0]["image"], bytes)


def test_flat_folder_is_the_train_split(ray_local, folder, tmp_path):
    info = make_image_folder(tmp_path, n_per_class=2, classes=("a", "b"), size=16,
                             bad_files=False, split=None)
    cfg = folder_cfg(info["root"])
    assert sorted(r["label"] for r in load_split(cfg, "train").take_all()) == [0, 0, 1, 1]
    with pytest.raises(DataError, match="val"):
        load_split(cfg, "val")


def test_missing_or_empty_sources_fail_with_one_clear_line(ray_local, tmp_path):
    missing = tmp_path / "nope"
    cases = [(folder_cfg(missing), str(missing))]
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    cases.append((folder_cfg(empty), str(empty / "train")))  # no class folders
    no_files = tmp_path / "no_files"
    (no_files / "train" / "cat").mkdir(parents=True)
    (no_files / "train" / "cat" / ".hidden.jpg").write_bytes(b"x")
    cases.append((folder_cfg(no_files), str(no_files / "train")))  # class folder, no files
    cases.append((folder_cfg(missing, source="parquet"), str(missing)))
    cases.append((folder_cfg(empty, source="parquet"), str(empty / "train")))  # no .parquet
    cfg = folder_cfg(tmp_path)
    cfg.data.source, cfg.data.path = "fashion_mnist", str(missing)
    cases.append((cfg, str(missing)))
    for cfg, path in cases:
        with pytest.raises(ConfigError) as e:
            load_split(cfg, "train")
        msg = str(e.value)
        assert isinstance(e.value, DataError) and "\n" not in msg and path in msg, msg


def test_fashion_mnist_loads(ray_local):
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DIR})")
    cfg = Config()
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert train.count() == 60000 and val.count() == 10000
    head = train.limit(2000).take_batch(2000)
    assert head["image"].shape == (2000, 28, 28) and head["image"].dtype == np.uint8
    assert set(head["label"].tolist()) == set(range(10))
    images, labels = read_fashion_mnist(None, "train")  # sample_id = row of the IDX file
    assert (images[head["sample_id"]] == head["image"]).all()
    assert (labels[head["sample_id"]] == head["label"]).all()
    cfg.data.limit_train, cfg.method.args["mask_ratio"] = 100, 0.75
    batch = collect(train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)))
    assert batch["image"].shape == (100, 1, 28, 28) and batch["skipped"].sum() == 0
    assert class_names(cfg)[9] == "Ankle boot"


# ----------------------------------------------------------------------------- streams


def test_train_stream_shapes_masks_and_skipped(ray_local, folder):
    cfg = folder_cfg(folder["root"])
    batch = collect(train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)))
    n, k = folder["good"], patches_per_view(64, 0.75)
    assert batch["image"].shape == (n, 3, 32, 32) and batch["image"].dtype == np.uint8
    for col in ("label", "sample_id", "skipped"):
        assert batch[col].shape == (n,) and batch[col].dtype == np.int64
    assert batch["skipped"].sum() == BAD_FILES
    assert sorted(set(batch)) == ["image", "label", "sample_id", "skipped", "view1", "view2"]
    v1, v2 = batch["view1"], batch["view2"]
    assert v1.shape == v2.shape == (n, k) and v1.dtype == np.int64
    for a, b in zip(v1, v2, strict=True):
        assert len(set(a) | set(b)) == 2 * k and max(a.max(), b.max()) < 64
    # Grayscale model: RGB files are converted to one channel.
    gray = folder_cfg(folder["root"], in_chans=1)
    gray_batch = collect(train_stream(load_split(gray, "train"), gray, 0, stream_spec(gray)))
    assert gray_batch["image"].shape[1] == 1


def test_train_stream_is_reproducible_per_epoch(ray_local, folder):
    cfg = folder_cfg(folder["root"])
    cfg.data.map_batch_size = 5  # batching must not matter
    ds = load_split(cfg, "train")
    a = by_id(collect(train_stream(ds, cfg, 3, stream_spec(cfg))))
    cfg.data.map_batch_size = 64
    b = by_id(collect(train_stream(load_split(cfg, "train"), cfg, 3, stream_spec(cfg))))
    c = by_id(collect(train_stream(ds, cfg, 4, stream_spec(cfg))))
    for key in ("image", "view1", "view2", "label", "sample_id"):
        assert (a[key] == b[key]).all(), key
    assert (a["sample_id"] == c["sample_id"]).all()
    assert not (a["view1"] == c["view1"]).all() and not (a["image"] == c["image"]).all()


def test_each_epoch_mixes_new_batches_of_an_in_memory_set(ray_local):
    """Fashion-MNIST sits in memory in file order, in blocks of neighbouring rows: each epoch
    puts the blocks in a new order, and the trainer re-mixes its batches within windows of
    data.shuffle_buffer rows; otherwise every epoch would train on the same batches in the
    same order (for MiCL, the same negatives)."""
    cfg = folder_cfg("", img_size=28, in_chans=1, source="fashion_mnist")
    cfg.data.path, cfg.data.limit_train, cfg.data.batch_size = None, 2048, 64
    cfg.data.shuffle_buffer = 512  # a quarter of the set: 8 batches, 8 blocks of 64 rows
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DIR})")
    stream = train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg))

    def epoch(seed: int) -> list[frozenset[int]]:  # what the training loop iterates
        batches = stream.iter_torch_batches(batch_size=64, drop_last=True)
        return [frozenset(b["sample_id"].tolist()) for b in
                mix_batches(batches, cfg.data.shuffle_buffer, torch.Generator().manual_seed(seed))]

    epochs = [epoch(0), epoch(1)]
    for batches in epochs:  # every sample once per epoch (the last partial batch dropped)
        ids = [i for b in batches for i in b]
        assert len(ids) == len(set(ids)) == 2048 // 64 * 64 and max(ids) < 2048
    first, second = epochs
    assert not set(first) & set(second)  # no batch of epoch 1 comes back in epoch 2
    # Each window holds blocks from all over the set (the block order), so every batch spans
    # more ids than a window of neighbouring rows could (a fixed order: at most 511).
    spans = [max(b) - min(b) for b in first + second]
    assert min(spans) > cfg.data.shuffle_buffer, sorted(spans)[:4]


def test_the_helper_actors_of_a_fit_start_without_ray_data():
    """A driver's epoch clocks (which also relay the console) are an actor, a process that
    first imports its class's module: those import Ray and nothing heavy (Ray Data, pyarrow,
    PIL, torch)."""
    probe = ("import sys, ray, micl.console, micl.data.clock; print(sorted(m for m in "
             "('ray.data', 'pyarrow', 'PIL', 'numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "[]", out


def test_epoch_clock_drives_the_epoch(ray_local, folder):
    cfg = folder_cfg(folder["root"])
    ds = load_split(cfg, "train")
    name = new_clock_name("test-data")
    clock = epoch_clock(name)
    ray.get(clock.set.remote(7))
    assert ray.get(epoch_clock(name).get.remote()) == 7  # get-or-create
    # One Dataset, re-executed per epoch.
    stream = train_stream(ds, cfg, name, stream_spec(cfg))
    for epoch in (2, 5):
        ray.get(clock.set.remote(epoch))
        got = by_id(collect(stream))
        want = by_id(collect(train_stream(ds, cfg, epoch, stream_spec(cfg))))
        assert (got["view1"] == want["view1"]).all() and (got["image"] == want["image"]).all()
    clock.close()


def test_epoch_clock_counts_a_restarted_epoch_afresh(ray_local):
    """Each worker starts each epoch with set(epoch, attempt); a restart after a worker died
    in that epoch streams it again, so its bad files are counted again from zero."""
    clock = epoch_clock(new_clock_name("test-data-restart"))
    for rank in (0, 1):
        ray.get(clock.set.remote(2, 0))
        ray.get(clock.add_skipped.remote(2, 3, [f"bad-{rank}.jpg"]))
    assert ray.get(clock.skipped.remote(2))[0] == 6  # both workers' map tasks, attempt 0
    ray.get(clock.set.remote(2, 1))  # the restart's first worker
    ray.get(clock.add_skipped.remote(2, 3, ["bad-0.jpg"]))
    ray.get(clock.set.remote(2, 1))  # its second worker: no reset within an attempt
    ray.get(clock.add_skipped.remote(2, 3, ["bad-1.jpg"]))
    count, examples = ray.get(clock.skipped.remote(2))
    assert count == 6 and examples == ["bad-0.jpg", "bad-1.jpg"]
    clock.close()


def test_all_bad_batch_raises(ray_local, tmp_path):
    d = tmp_path / "train" / "junk"
    d.mkdir(parents=True)
    for i in range(20):
        (d / f"bad_{i}.jpg").write_bytes(b"garbage" * i)
    cfg = folder_cfg(tmp_path)
    cfg.data.map_batch_size = 20
    with pytest.raises(Exception, match="undecodable"):
        train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)).take_all()


def test_eval_stream(ray_local, folder):
    cfg = folder_cfg(folder["root"], img_size=16)
    cfg.method.args["mask_ratio"] = 0.5
    batch = collect(eval_stream(load_split(cfg, "train"), cfg))
    assert sorted(batch) == ["image", "label", "sample_id"]
    assert batch["image"].shape == (folder["good"], 3, 16, 16)
    again = by_id(collect(eval_stream(load_split(cfg, "train"), cfg)))
    assert (by_id(batch)["image"] == again["image"]).all()


def test_synthetic_source_streams(ray_local):
    cfg = Config()
    cfg.data.source, cfg.data.synthetic_size, cfg.data.synthetic_classes = "synthetic", 64, 4
    cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = 16, 4, 3
    cfg.method.args["mask_ratio"] = 0.5
    train = collect(train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)))
    assert train["image"].shape == (64, 3, 16, 16) and set(train["label"]) == {0, 1, 2, 3}
    val = collect(eval_stream(load_split(cfg, "val"), cfg))
    assert len(val["label"]) == 16 and not set(val["sample_id"]) & set(train["sample_id"])
    # The size the driver plans epochs with, from the config alone, is what streams.
    assert (split_size(cfg, "train"), split_size(cfg, "val"), split_size(cfg, "val", 10)) == \
        (64, 16, 10)


def test_prepare_data_shards_load_and_stream(ray_local, folder, tmp_path):
    dst = tmp_path / "shards"
    cli = [sys.executable, str(ROOT / "pipelines" / "prepare_data.py"), "--src", folder["root"],
           "--dst", str(dst), "--size", "20", "--splits", "train", "val",
           "--rows-per-shard", "5", "--workers", "1"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{BAD_FILES} undecodable files skipped" in out.stdout
    assert len(list((dst / "train").glob("part-*.parquet"))) == 3  # 12 good images / 5
    # Running it again without --overwrite refuses, in one line.
    again = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds" in again.stderr

    cfg = folder_cfg(dst, source="parquet")
    assert class_names(cfg) == ["cat", "dog", "fish"]
    rows = load_split(cfg, "train").take_all()
    folder_rows = load_split(folder_cfg(folder["root"]), "train").take_all()
    want = {r["path"]: (r["label"], r["sample_id"]) for r in folder_rows
            if r["path"] not in folder["bad"]}
    assert {r["path"]: (r["label"], r["sample_id"]) for r in rows} == want
    assert max(Image.open(io.BytesIO(r["image"])).size[1] for r in rows) <= 24  # never upscaled
    assert min(min(Image.open(io.BytesIO(r["image"])).size) for r in rows) == 20
    batch = collect(train_stream(load_split(cfg, "train"), cfg, 0, stream_spec(cfg)))
    assert batch["image"].shape == (12, 3, 32, 32) and batch["skipped"].sum() == 0
    assert len(load_split(cfg, "val").take_all()) == 6
    # limit_train takes the same first rows on every execution.
    cfg.data.limit_train = 7
    firsts = [sorted(r["sample_id"] for r in load_split(cfg, "train").take_all())
              for _ in range(2)]
    assert len(firsts[0]) == 7 and firsts[0] == firsts[1]


def test_write_parquet_shards_reports_bad_files(folder, tmp_path):
    reports = write_parquet_shards(folder["root"], str(tmp_path), size=16, splits=["train"],
                                   rows_per_shard=100, log=lambda _: None)
    assert reports["train"].written == folder["good"]
    assert sorted(reports["train"].bad_paths) == sorted(folder["bad"])
