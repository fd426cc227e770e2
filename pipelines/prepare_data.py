"""Convert an ImageFolder tree (ImageNet layout) into Parquet shards for `data.source: parquet`.

    python pipelines/prepare_data.py --src /data/imagenet --dst /data/imagenet-parquet \\
        --size 256 --splits train val --rows-per-shard 1000 --workers 16

Each image is shrunk so its shorter side is at most --size and re-encoded as JPEG quality 95.
Undecodable files are skipped and counted. --src and --dst may be s3:// (or other pyarrow) URIs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="ImageFolder root: <src>/<split>/<class>/")
    parser.add_argument("--dst", required=True, help="output root: <dst>/<split>/part-*.parquet")
    parser.add_argument("--size", type=int, default=256, help="max shorter side (never upscaled)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="splits to convert; the first one's classes define the labels")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes converting shards in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    args = parser.parse_args(argv)

    from micl.data.prepare import write_parquet_shards

    try:
        reports = write_parquet_shards(
            args.src, args.dst, size=args.size, splits=args.splits,
            rows_per_shard=args.rows_per_shard, quality=args.quality, workers=args.workers,
            seed=args.seed, overwrite=args.overwrite)
    except ConfigError as e:  # DataError is a ConfigError: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(r.written for r in reports.values())
    skipped = sum(r.skipped for r in reports.values())
    print(f"done: {total} images written, {skipped} skipped; train with "
          f"--set data.source=parquet --set data.path={args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
