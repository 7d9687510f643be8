"""Data-pipeline throughput per CPU core: a raw image folder, its LitData dataset, and the
memory-mapped shards that animevq 0.1 read, on the same stored images.

    python benchmarks/data_pipeline.py DIR --size 256
    python benchmarks/data_pipeline.py DIR --size 256 --count 1000 --loader_workers 2

For DIR it (a) times the raw-folder dataset (decode + resize + crop for every image),
(b) runs ``animevq prepare`` into a temporary folder (or uses ``--prepared``) and times the
LitData stream as training reads it (``ImageStream`` iterated in this process: LitData's
chunk reads, the shuffle, our crop and flip), and (c) writes the same stored images into one
0.1-style shard and times 0.1's read (a memory-mapped slice, the same crop and flip). All
in this one process (one torch thread), so images/s is images/s per core.
``--loader_workers W`` adds a DataLoader run with W worker processes (batches of
``--batch_size``). Not a test; it needs no GPU.
"""

from __future__ import annotations

import argparse
import random
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from animevq.data import AnimeDataModule, PrepareOptions, SampleKey, prepare_folder  # noqa: E402
from animevq.data.dataset import _seed_of  # noqa: E402
from animevq.data.transforms import stored_crop  # noqa: E402

_WARMUP = 16  # first items pay for imports, page faults and allocator growth


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def per_core_rate(data_dir: str, size: int, count: int, repeats: int) -> float:
    """Training samples per second in this process (the median of ``repeats`` timings: a
    shared VM is noisy): ``dataset[key]`` for a raw folder, iteration for a LitData stream."""
    dm = AnimeDataModule(data_dir, val_split=0.0, image_size=size, num_workers=0)
    dm.setup("fit")
    dataset = dm.train_dataset
    if dm.store is not None:
        return _stream_rate(dataset, count, repeats)
    for i in range(_WARMUP):
        dataset[SampleKey(i % len(dataset), 0)]
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        for i in range(count):  # epochs move on past len(dataset): new crops each time
            dataset[SampleKey(i % len(dataset), 1 + repeat + i // len(dataset))]
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def _stream_rate(dataset, count: int, repeats: int) -> float:
    rates = []
    for repeat in range(repeats + 1):  # the first pass maps the chunks: a warm-up
        seen, start = 0, time.perf_counter()
        epoch = 1
        while seen < count:
            dataset.set_epoch(epoch)
            for _ in dataset:
                seen += 1
                if seen >= count:
                    break
            epoch += 1
        if repeat:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def shard_rate(prepared: str, size: int, count: int, repeats: int, scratch: str) -> float:
    """animevq 0.1's read on the same stored images: one shard file of raw uint8 bytes,
    memory-mapped, each sample a slice, then the same crop and flip draws."""
    import litdata

    stream = litdata.StreamingDataset(prepared)
    images = [stream[i] for i in range(len(stream))]
    shard = os.path.join(scratch, "shard-00000.bin")
    with open(shard, "wb") as file:
        for image in images:
            file.write(image.tobytes())
    offsets = [0]
    for image in images[:-1]:
        offsets.append(offsets[-1] + image.nbytes)
    shapes = [image.shape for image in images]
    del images
    mapped = np.memmap(shard, dtype=np.uint8, mode="r")

    def sample(index: int, epoch: int) -> torch.Tensor:
        rng = random.Random(_seed_of("augment", 0, epoch, index))
        offset, flip = rng.random(), rng.random() < 0.5
        height, width, _ = shapes[index]
        pixels = mapped[offsets[index] : offsets[index] + height * width * 3].reshape(height, width, 3)
        return stored_crop(pixels, size, offset, flip)

    for i in range(_WARMUP):
        sample(i % len(shapes), 0)
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            sample(i % len(shapes), 1 + repeat + i // len(shapes))
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def loader_rate(data_dir: str, size: int, count: int, workers: int, batch_size: int) -> float:
    """Images per second through a DataLoader with ``workers`` processes (all cores)."""
    dm = AnimeDataModule(data_dir, batch_size=batch_size, val_split=0.0, image_size=size,
                         num_workers=workers, persistent_workers=True, pin_memory=False)
    loader = dm.train_dataloader()
    seen, start = 0, None
    while seen < count:
        for batch in loader:
            if start is None:  # the first batch waits for the workers to start
                start = time.perf_counter()
                continue
            seen += len(batch)
            if seen >= count:
                break
    assert start is not None
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="folder of images (png/jpg/...)")
    parser.add_argument("--size", type=int, default=256, help="training crop side")
    parser.add_argument("--count", type=int, default=500, help="images timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="per-core timings (median)")
    parser.add_argument("--prepared", default=None, help="an existing prepared dataset of data_dir")
    parser.add_argument("--prepare_workers", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--loader_workers", type=int, default=0, help="also time a DataLoader")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers: no intra-op threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    files = [p for p in Path(args.data_dir).rglob("*") if p.is_file()]
    kinds = Counter(p.suffix.lower() for p in files)
    results: dict[str, object] = {
        "cpu": cpu_model(), "cpus": cpus, "data_dir": args.data_dir, "files": dict(kinds),
        "size": args.size, "count": args.count,
    }
    print(f"CPU: {results['cpu']} ({cpus} cores available); {args.data_dir}: {dict(kinds)}; "
          f"crops {args.size}x{args.size}, {args.count} images per measurement")

    raw = per_core_rate(args.data_dir, args.size, args.count, args.repeats)
    results["raw_images_per_s_per_core"] = raw
    print(f"raw folder  (decode+resize) : {raw:9.1f} images/s per core")

    scratch = None
    prepared = args.prepared
    if prepared is None:
        scratch = tempfile.mkdtemp(prefix="animevq-bench-")
        prepared = os.path.join(scratch, "prepared")
        workers = args.prepare_workers or cpus
        result = prepare_folder(args.data_dir, prepared, PrepareOptions(size=args.size),
                                workers=workers, progress=False)
        rate = (result.num_images + result.skipped.total) / result.seconds
        results.update(prepare_files_per_s=rate, prepare_workers=workers,
                       prepared_bytes=result.num_bytes)
        print(f"prepare     (one time)      : {rate:9.1f} files/s with {workers} worker(s) "
              f"({rate / workers:.1f} per worker), {result.num_bytes / 1e6:.1f} MB written")
    try:
        fast = per_core_rate(prepared, args.size, args.count, args.repeats)
        results["litdata_images_per_s_per_core"] = fast
        print(f"LitData     (stream)        : {fast:9.1f} images/s per core "
              f"({fast / raw:.1f}x the raw folder)")
        old = shard_rate(prepared, args.size, args.count, args.repeats, scratch or tempfile.mkdtemp())
        results["shards_0_1_images_per_s_per_core"] = old
        print(f"0.1 shards  (memmap slice)  : {old:9.1f} images/s per core "
              f"(LitData: {100 * (fast / old - 1):+.1f} %)")
        if args.loader_workers:
            for name, folder in (("raw", args.data_dir), ("prepared", prepared)):
                rate = loader_rate(folder, args.size, args.count, args.loader_workers,
                                   args.batch_size)
                results[f"{name}_loader_images_per_s"] = rate
                print(f"DataLoader {name:9s} ({args.loader_workers} workers): {rate:9.1f} images/s")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
