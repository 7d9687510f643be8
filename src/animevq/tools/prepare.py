"""``animevq prepare SRC DST``: decode a folder of images once into a LitData dataset, in a
folder or a bucket, that ``AnimeDataModule`` streams (:func:`animevq.data.prepare_folder`).

    animevq prepare data/illustrations data/illustrations-256 --size 256 --workers 16
    animevq prepare data/illustrations s3://my-bucket/illustrations-256
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..data.prepare import DEFAULT_CHUNK_MB, MEGABYTE, PrepareOptions, prepare_folder
from .common import run_tool

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """``animevq prepare SRC DST [--size 256] [--workers N] [--chunk_size_mb 64]``."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="animevq prepare",
        description="Decode a folder of images once into a LitData dataset (resized to the "
        "training size, validated, bad files reported) in a folder or a bucket, for data_dir. "
        "SRC may also be a folder prepared by animevq 0.1, to convert it.",
    )
    add = parser.add_argument
    add("src", help="folder of images (searched recursively), or a folder prepared by animevq 0.1")
    add("dst", help="new folder, or an object-store URL (s3://bucket/prefix, gs://…); "
        "pass it as data_dir afterwards")
    defaults = PrepareOptions()
    add("--size", type=int, default=defaults.size, help="stored short side; train at image_size <= size")
    add("--max_aspect", type=float, default=defaults.max_aspect, help="longest stored side / size")
    add("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    add("--chunk_size_mb", type=float, default=float(DEFAULT_CHUNK_MB), help="size of each LitData chunk")
    add("--min_image_size", type=int, default=defaults.min_image_size, help="skip smaller images")
    add("--max_image_pixels", type=int, default=defaults.max_image_pixels, help="refuse larger ones")
    add("--max_image_bytes", type=int, default=defaults.max_image_bytes,
        help="refuse files whose decoding and conversion to RGB need more memory")
    add("--overwrite", action="store_true", help="replace a prepared DST")
    add("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv)[1:])
    options = PrepareOptions(args.size, args.max_aspect, args.min_image_size, args.max_image_pixels,
                             args.max_image_bytes)

    def work() -> str:
        result = prepare_folder(
            args.src, args.dst, options, workers=args.workers, overwrite=args.overwrite,
            chunk_bytes=max(1, int(args.chunk_size_mb * MEGABYTE)), progress=not args.no_progress,
        )
        if result.already_prepared:
            return (f"{result.dst} already holds {result.num_images} images prepared from "
                    f"{args.src} with these settings; nothing to do (--overwrite rebuilds it)")
        done = result.num_images + result.skipped.total
        resumed = ", continuing an interrupted run" if result.resumed else ""
        summary = (f"prepared {result.num_images} images (short side {options.size}) into {result.dst}: "
                   f"{result.num_chunks} LitData chunk(s), {result.num_bytes / 1e9:.2f} GB, "
                   f"{result.seconds:.1f} s ({done / max(result.seconds, 1e-9):.0f} files/s){resumed}")
        if result.skipped.total:
            summary += "\n" + result.skipped.message(when="(listed in animevq.json)", max_examples=5)
        return summary

    return run_tool("prepare", work, out=args.dst, interrupted="run the same command again to resume")
