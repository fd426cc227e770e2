"""Fashion-MNIST's IDX files, read without Ray: the data error type and the file reader that
both the Ray Data sources (micl.data.sources) and the plain-PyTorch benchmarks use."""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

from micl.config import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ConfigError):
    """The data a config points at is missing, empty or malformed (one line, naming the path)."""


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) -> ndarray of its shape and dtype."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"data error: {path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise DataError(f"data error: {path}: unknown IDX data type 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise DataError(f"data error: {path}: {len(body)} data bytes, expected shape {shape}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, name: str) -> str | None:
    for sub in ("", "raw", "FashionMNIST/raw"):
        for suffix in ("", ".gz"):
            p = os.path.join(directory, sub, name + suffix)
            if os.path.isfile(p):
                return p
    return None


def read_fashion_mnist(directory: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's "train" or "test" (t10k) split from its IDX files (.gz or not) under
    directory (None: Debian's dataset-fashion-mnist): uint8 images [N, 28, 28], labels [N]."""
    directory = directory or FASHION_MNIST_DIR
    found = [_find_idx(directory, n) for n in _FMNIST_FILES[split]]
    if None in found:
        missing = _FMNIST_FILES[split][found.index(None)]
        raise DataError(f"data error: {directory}: no Fashion-MNIST file {missing}[.gz] "
                        "(apt-get install dataset-fashion-mnist, or set data.path)")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if len(images) != len(labels):
        raise DataError(f"data error: {directory}: {len(images)} images but {len(labels)} labels")
    return images, labels
