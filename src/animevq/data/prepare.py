"""Decode a folder of images once into the prepared format (:mod:`animevq.data.prepared`)
that :class:`~animevq.data.AnimeDataModule` reads without decoding (``animevq prepare``,
:mod:`animevq.tools.prepare`).

Files are decoded in parallel by the robust loader of :mod:`animevq.data.images`; files
it refuses are listed in the manifest with their reason. Everything is written into
``DST.tmp`` and renamed to ``DST`` at the end, so ``DST`` is either complete or absent.
Each finished shard is recorded in ``DST.tmp/journal.jsonl``: an interrupted run (Ctrl-C,
a crash, a lost node) resumes from its last finished shard when run again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from animevq.data.dataset import SkipReport
from animevq.data.discovery import find_images
from animevq.data.images import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageSkipped,
    load_image,
)
from animevq.data.names import shown
from animevq.data.prepared import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    PATHS_NAME,
    SkippedFile,
    is_prepared,
    read_prepared,
    shard_name,
    stored_image,
)
from animevq.data.shards import JOURNAL_NAME, ShardWriter, listing_digest

MEGABYTE = 1 << 20
_CHUNK = 8  # files per task sent to a worker: amortises IPC without starving the progress bar


@dataclass(frozen=True)
class PrepareOptions:
    """What a prepared folder depends on besides the source files; a run resumes, or
    counts as already done, only when these match."""

    size: int = 256  # the training resolution
    max_aspect: float = 2.0  # keeps 2:3 and 9:16 illustrations whole; longer ones centre-cropped
    min_image_size: int = DEFAULT_MIN_SIDE
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_DECODED_BYTES


class PrepareResult(NamedTuple):
    """What :func:`prepare_folder` did."""

    dst: Path
    num_images: int
    skipped: SkipReport  # files left out, with reasons
    num_shards: int
    num_bytes: int
    seconds: float  # 0.0 when the folder was already prepared
    resumed: int  # source files done by an earlier, interrupted run
    already_prepared: bool


class Converted(NamedTuple):
    """One source file after decoding: pixels (H,W,3) or the reason it was skipped."""

    pixels: np.ndarray | None
    reason: str
    detail: str


_worker_state: dict[str, Any] = {}  # set in each worker by _init_worker


def _init_worker(root: str, options: PrepareOptions) -> None:
    _worker_state.update(root=root, options=options)


def _convert(relative: str) -> Converted:
    root, options = _worker_state["root"], _worker_state["options"]
    try:
        image = load_image(
            os.path.join(root, relative), max_pixels=options.max_image_pixels,
            max_bytes=options.max_image_bytes,
            min_side=options.min_image_size, target_size=options.size,
        )
    except ImageSkipped as skip:
        return Converted(None, skip.reason.label, skip.detail)
    return Converted(stored_image(image, options.size, options.max_aspect), "", "")


def _converted(
    files: Sequence[str], root: str, options: PrepareOptions, workers: int
) -> Iterator[Converted]:
    """Decode ``files`` in order, in ``workers`` processes (in this one when workers <= 1)."""
    if workers <= 1:
        _init_worker(root, options)
        yield from (_convert(relative) for relative in files)
        return
    with multiprocessing.Pool(workers, _init_worker, (root, options)) as pool:
        yield from pool.imap(_convert, files, chunksize=_CHUNK)


def available_cpus() -> int:
    """CPUs this process may use (respects taskset and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check_destination(dst: Path, src: Path, options: PrepareOptions, overwrite: bool) -> bool:
    """True if ``dst`` already holds this preparation; raises if it holds anything else."""
    if not dst.exists():
        return False
    if not dst.is_dir():
        raise ValueError(f"DST {shown(dst)} is a file; choose a folder path for the prepared data")
    if is_prepared(dst):
        if overwrite:
            return False
        manifest = read_prepared(dst).manifest
        # A folder prepared before an option existed was prepared as its default does.
        recorded = {**asdict(PrepareOptions()), **manifest["options"]}
        if recorded == asdict(options) and manifest["source"] == str(src):
            return True
        raise ValueError(
            f"DST {shown(dst)} already holds data prepared from {shown(manifest['source'])} with "
            f"{manifest['options']}; pass --overwrite to replace it, or choose another DST"
        )
    if any(dst.iterdir()):
        raise ValueError(
            f"DST {shown(dst)} exists and is not a prepared folder (no {MANIFEST_NAME}); refusing "
            "to write into it: choose a new or empty folder"
        )
    return False


def prepare_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: PrepareOptions = PrepareOptions(),
    *,
    workers: int | None = None,
    shard_bytes: int = 1024 * MEGABYTE,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Convert every image under ``src`` into a prepared folder at ``dst``, with
    ``workers`` decoding processes (None: every available CPU).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` holds no (usable) images, ``dst`` holds something else, or
            ``dst`` cannot be written.
    """
    started = time.perf_counter()
    src_path = Path(src).expanduser().absolute()
    dst_path = Path(dst).expanduser().absolute()
    if options.size < 1 or options.max_aspect < 1.0 or shard_bytes < 1:
        raise ValueError(f"need size >= 1, max_aspect >= 1, shard size > 0; got {options}")
    listing = find_images(src_path, role="SRC")
    files = listing.files
    if _check_destination(dst_path, src_path, options, overwrite):
        folder = read_prepared(dst_path)
        total = sum(shard["bytes"] for shard in folder.manifest["shards"])
        return PrepareResult(dst_path, len(folder.paths), _report(folder.skipped),
                             len(folder.shards), total, 0.0, 0, already_prepared=True)
    tmp = dst_path.with_name(dst_path.name + ".tmp")
    header = {"source": str(src_path), "options": asdict(options), "files": listing_digest(files)}
    writer = ShardWriter.open(tmp, header)  # resumes a matching interrupted run
    resumed = writer.next_file
    workers = available_cpus() if workers is None else max(1, workers)
    decoded = _converted(files[resumed:], str(src_path), options, workers)
    with tqdm(total=len(files), initial=resumed, unit="img", desc="prepare",
              disable=not progress, dynamic_ncols=True) as bar:
        for position, item in enumerate(decoded, start=resumed):
            if item.pixels is None:
                writer.skip(position, item.reason, item.detail)
            else:
                if writer.shard_used and writer.shard_used + item.pixels.nbytes > shard_bytes:
                    writer.close_shard(next_file=position)
                writer.add(position, item.pixels)
            bar.update()
    writer.close_shard(next_file=len(files))
    skipped = [SkippedFile(path, reason.label, "refused while listing", "listing")
               for path, reason in listing.skipped]
    skipped += [SkippedFile(files[position], reason, detail, "loading")
                for position, reason, detail in writer.skipped]
    skipped.sort()
    if not writer.images:
        shutil.rmtree(tmp, ignore_errors=True)
        counts = ", ".join(f"{n} {label}" for label, n in _report(skipped).counts.items())
        raise ValueError(
            f"none of the {len(files)} image files under {shown(src_path)} could be used "
            f"({counts}); "
            "fix or remove them"
        )
    manifest = _write_outputs(tmp, writer, files, skipped, src_path, options)
    _publish(tmp, dst_path)
    (dst_path / JOURNAL_NAME).unlink()  # only now: until published, a rerun can still resume
    total = sum(shard["bytes"] for shard in manifest["shards"])
    return PrepareResult(dst_path, manifest["num_images"], _report(skipped),
                         len(manifest["shards"]), total, time.perf_counter() - started, resumed,
                         already_prepared=False)


def _report(skipped: Sequence[SkippedFile]) -> SkipReport:
    return SkipReport(tuple(sorted((item.path, item.reason) for item in skipped)))


def _write_outputs(
    tmp: Path,
    writer: ShardWriter,
    files: list[str],
    skipped: list[SkippedFile],
    src: Path,
    options: PrepareOptions,
) -> dict[str, Any]:
    """index.npy, paths.json, then manifest.json last: its presence marks a complete folder."""
    rows = sorted(writer.images)  # (position, shard, offset, height, width), by source path
    index = np.array([row[1:] for row in rows], dtype=np.int64).reshape(-1, 4)  # (N,4)
    np.save(tmp / INDEX_NAME, index)
    (tmp / PATHS_NAME).write_text(json.dumps([files[row[0]] for row in rows]), encoding="utf-8")
    shards = [{"name": shard_name(k), "bytes": size} for k, size in enumerate(writer.shard_sizes)]
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "size": options.size,
        "layout": "uint8 (H,W,3) per image; index.npy rows: shard, byte offset, height, width",
        "source": str(src), "options": asdict(options),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_files": len(files), "num_images": len(rows), "num_skipped": len(skipped),
        "skipped_counts": _report(skipped).counts, "shards": shards,
        "skipped": [item._asdict() for item in skipped],
    }
    part = tmp / (MANIFEST_NAME + ".part")
    part.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(part, tmp / MANIFEST_NAME)
    return manifest


def _publish(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``, replacing an empty or prepared ``dst``."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)  # dst is gone for a moment only; tmp is complete by now
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
