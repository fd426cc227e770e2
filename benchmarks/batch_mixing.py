"""What re-mixing the training batches each epoch costs the training process: the stream's
batches as they come (plus one copy of each, the least a training step does with them), against
`micl.train.mix_batches` over a window of data.shuffle_buffer rows, and Ray Data's own local
shuffle buffer of the same size, all in one process on one in-memory Dataset.

    python benchmarks/batch_mixing.py                 # 4,096 images of 3x224x224, batch 256
    python benchmarks/batch_mixing.py --px 28 --channels 1 --images 60000   # Fashion-MNIST-sized

Why: without re-mixing, a stream's neighbouring rows (a Parquet shard's, an in-memory set's)
form the same batches every epoch (BENCHMARKS.md, "Every epoch, new batches"). The mixing runs
in the training process, so what it costs per image is what a GPU's feeder pays.
"""

from __future__ import annotations

import argparse
import time

import _common
import numpy as np
import ray
import torch

from micl.train import mix_batches


def rows_per_s(batches, touch: bool) -> float:
    """Rows per second through `batches`; touch: copy each batch (reads every pixel)."""
    t, rows = time.perf_counter(), 0
    for batch in batches:
        rows += len(batch["data"].clone() if touch else batch["data"])
    return rows / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--window", type=int, default=2048, help="data.shuffle_buffer")
    p.add_argument("--threads", type=int, default=1, help="torch threads (run.torch_threads)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    _common.start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (a.images, a.channels, a.px, a.px), dtype=np.uint8)
    ds = ray.data.from_numpy(images).materialize()

    def stream():
        return ds.iter_torch_batches(batch_size=a.batch, drop_last=True)

    ways = {
        "the stream's batches, one copy each (baseline)": lambda: rows_per_s(stream(), True),
        f"mix_batches, window {a.window}": lambda: rows_per_s(
            mix_batches(stream(), a.window, torch.Generator().manual_seed(0)), False),
        f"Ray Data local_shuffle_buffer_size={a.window}": lambda: rows_per_s(
            ds.iter_torch_batches(batch_size=a.batch, drop_last=True,
                                  local_shuffle_buffer_size=a.window), False),
    }
    best = {name: 0.0 for name in ways}
    for _ in range(a.rounds):  # alternated, best of rounds: the VM's drift hits each alike
        for name, way in ways.items():
            best[name] = max(best[name], way())
    base = best[next(iter(ways))]
    _common.append_result(
        f"Batch mixing: {a.images} images of {a.channels}x{a.px}x{a.px}, batch {a.batch}",
        _common.markdown_table(["way", "images/s (best of rounds)", "vs baseline"],
                               [[n, f"{v:,.0f}", f"{v / base:.2f}"] for n, v in best.items()]),
        [f"{a.rounds} alternating rounds; torch threads {a.threads}; the Dataset materialized "
         "in the object store first"])
    ray.shutdown()


if __name__ == "__main__":
    main()
