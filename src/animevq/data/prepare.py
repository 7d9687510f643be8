"""``animevq prepare SRC DST``: decode a folder of images once into a LitData dataset
(:mod:`animevq.data.store`) that :class:`~animevq.data.AnimeDataModule` streams.

Files are decoded by ``litdata.optimize`` in worker processes, with the robust loader of
:mod:`animevq.data.images`; each good image becomes one item (:func:`stored_image`), each
file it refuses a line in that worker's skip log, and ``animevq.json`` lists them all with
their reasons. Items are written in a fixed order that is not the folders' (sorted by a hash
of each path), so chunks mix the source folders and a split by chunks is a random one.

A local ``DST`` is written in ``DST.tmp`` and renamed at the end, so it is complete or absent;
an object-store ``DST`` is complete once ``animevq.json`` is there (written last). LitData's
checkpoints make an interrupted run (Ctrl-C, a crash, a lost node) continue where it stopped
when the same command runs again. ``SRC`` may also be a folder prepared by animevq 0.1: its
stored images are converted without decoding the source files again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from animevq.data.dataset import SkipReport
from animevq.data.discovery import find_images
from animevq.data.images import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageSkipped,
    SkipReason,
    load_image,
)
from animevq.data.legacy import LegacyFolder, is_legacy, legacy_pixels, read_legacy
from animevq.data.names import shown
from animevq.data.store import (
    INDEX_NAME,
    INFO_NAME,
    SkippedFile,
    StoreInfo,
    is_url,
    normalized,
    read_info,
    read_text,
    write_text,
)
from animevq.data.transforms import stored_image

MEGABYTE = 1 << 20
DEFAULT_CHUNK_MB = 64  # LitData's advice: large enough for object storage, small enough to cache
_HEADER_NAME = "prepare.json"  # in the work folder: what an interrupted run was doing


@dataclass(frozen=True)
class PrepareOptions:
    """What a prepared dataset depends on besides the source files; a run resumes, or
    counts as already done, only when these match."""

    size: int = 256  # the training resolution
    max_aspect: float = 2.0  # keeps 2:3 and 9:16 illustrations whole; longer ones centre-cropped
    min_image_size: int = DEFAULT_MIN_SIDE
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_DECODED_BYTES


class PrepareResult(NamedTuple):
    """What :func:`prepare_folder` did."""

    dst: str  # an absolute path or a URL
    num_images: int
    skipped: SkipReport  # files left out, with reasons
    num_chunks: int
    num_bytes: int
    seconds: float  # 0.0 when the dataset was already prepared
    resumed: bool  # an interrupted run was continued
    already_prepared: bool


class _Converter:
    """``litdata.optimize``'s function: source position → stored image, or None (the
    reason appended to this process's skip log). Pickled once into each worker."""

    def __init__(self, root: str, names: list[str], options: PrepareOptions, skip_dir: str,
                 legacy: bool) -> None:
        self.root, self.names, self.options = root, names, options
        self.skip_dir, self.legacy = skip_dir, legacy
        self._folder: LegacyFolder | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_folder": None}

    def __call__(self, position: int) -> np.ndarray | None:
        if self.legacy:
            if self._folder is None:
                self._folder = read_legacy(self.root)
            pixels = legacy_pixels(self._folder, position)
            if pixels is None:
                self._skip(self._folder.paths[position], SkipReason.BAD_INDEX_ROW.label,
                           "its index row is outside its shard")
            return pixels
        relative = self.names[position]
        options = self.options
        try:
            image = load_image(os.path.join(self.root, relative), max_pixels=options.max_image_pixels,
                               max_bytes=options.max_image_bytes, min_side=options.min_image_size,
                               target_size=options.size)
        except ImageSkipped as skip:
            self._skip(relative, skip.reason.label, skip.detail)
            return None
        return stored_image(image, options.size, options.max_aspect)

    def _skip(self, path: str, reason: str, detail: str) -> None:
        line = json.dumps({"path": path, "reason": reason, "detail": detail})
        with open(os.path.join(self.skip_dir, f"skipped-{os.getpid()}.jsonl"), "a",
                  encoding="utf-8", errors="surrogateescape") as log:
            log.write(line + "\n")


def available_cpus() -> int:
    """CPUs this process may use (respects taskset and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _hashed_order(names: list[str]) -> list[int]:
    """Positions of ``names`` sorted by a hash of each name: fixed, and unrelated to folders."""
    def key(position: int) -> bytes:
        return hashlib.blake2b(names[position].encode("utf-8", "surrogateescape"), digest_size=8).digest()

    return sorted(range(len(names)), key=key)


def _check_destination(dst: str, src: str, options: PrepareOptions, overwrite: bool) -> StoreInfo | None:
    """The description of ``dst`` if it already holds this preparation; raises if it holds
    anything else (unless ``overwrite``)."""
    info = read_info(dst)
    if info is not None:
        recorded = {**asdict(PrepareOptions()), **info.options}
        if not overwrite and recorded == asdict(options) and info.source == src:
            return info
        if not overwrite:
            raise ValueError(
                f"DST {shown(dst)} already holds data prepared from {shown(info.source)} with "
                f"{info.options}; pass --overwrite to replace it, or choose another DST"
            )
        return None
    if is_url(dst):
        if not overwrite and read_text(dst, INDEX_NAME) is not None:
            raise ValueError(f"DST {dst} holds a LitData dataset that animevq did not finish "
                             "writing; pass --overwrite to replace it, or choose another DST")
        return None
    path = Path(dst)
    if path.exists() and not path.is_dir():
        raise ValueError(f"DST {shown(dst)} is a file; choose a folder path for the prepared data")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"DST {shown(dst)} exists and is not a prepared dataset (no {INFO_NAME}); "
                         "refusing to write into it: choose a new or empty folder")
    return None


def _work_folder(dst: str) -> Path:
    """Where the skip logs and the run's header live while ``dst`` is written."""
    if not is_url(dst):
        return Path(dst + ".tmp")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.blake2b(dst.encode(), digest_size=8).hexdigest()
    return cache / "animevq" / "prepare" / digest


def _start(work: Path, header: dict[str, Any]) -> bool:
    """Prepare ``work`` for a run with ``header``: True if it continues an interrupted one."""
    header_file = work / _HEADER_NAME
    try:
        if json.loads(header_file.read_text(encoding="utf-8")) == header:
            return True
    except (OSError, ValueError):
        pass
    if work.exists():
        shutil.rmtree(work)
    try:
        (work / "skipped").mkdir(parents=True)
        header_file.write_text(json.dumps(header), encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot write {shown(work)}: {error}; choose a DST in a writable place") from error
    return False


def prepare_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: PrepareOptions = PrepareOptions(),
    *,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_MB * MEGABYTE,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Convert every image under ``src`` (or a folder prepared by animevq 0.1) into a
    LitData dataset at ``dst`` (a folder or an object-store URL), with ``workers``
    decoding processes (None: every available CPU).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` holds no (usable) images, ``dst`` holds something else, or
            ``dst`` cannot be written.
    """
    started = time.perf_counter()
    src_path = Path(src).expanduser().absolute()
    where = normalized(dst)
    if options.size < 1 or options.max_aspect < 1.0 or chunk_bytes < 1:
        raise ValueError(f"need size >= 1, max_aspect >= 1, chunk size > 0; got {options}")
    legacy = is_legacy(src_path)
    if legacy:
        folder = read_legacy(src_path)
        if options.size != folder.size:
            raise ValueError(f"SRC {shown(src_path)} was prepared by animevq 0.1 at size {folder.size}; "
                             f"converting keeps it: pass --size {folder.size}, or prepare its source folder")
        names, listing_skipped = folder.paths, [item for item in folder.skipped]
        source = folder.manifest.get("source", str(src_path))
    else:
        listing = find_images(src_path, role="SRC")
        names, source = listing.files, str(src_path)
        listing_skipped = [SkippedFile(path, reason.label, "refused while listing", "listing")
                           for path, reason in listing.skipped]
    done = _check_destination(where, source, options, overwrite)
    if done is not None:
        return PrepareResult(where, done.num_images, _report(done.skipped), 0, 0, 0.0, False,
                             already_prepared=True)
    work = _work_folder(where)
    digest = hashlib.blake2b("\0".join(names).encode("utf-8", "surrogateescape"), digest_size=16)
    header = {"source": source, "src": str(src_path), "options": asdict(options), "dst": where,
              "files": digest.hexdigest(), "chunk_bytes": chunk_bytes}
    resumed = _start(work, header)
    output = str(work / "data") if not is_url(where) else where
    converter = _Converter(str(src_path), names, options, str(work / "skipped"), legacy)
    _optimize(converter, _hashed_order(names), output, workers, chunk_bytes, progress,
              fresh_remote=is_url(where) and not resumed)
    skipped = sorted(listing_skipped + _read_skips(work / "skipped"))
    index = json.loads(read_text(output, INDEX_NAME) or "{}")
    chunks = index.get("chunks", [])
    count = sum(chunk["chunk_size"] for chunk in chunks)
    if count == 0:
        counts = ", ".join(f"{n} {label}" for label, n in _report(skipped).counts.items())
        raise ValueError(f"none of the {len(names)} image files under {shown(src_path)} could be used "
                         f"({counts}); fix or remove them")
    recorded = asdict(options) if not legacy else {**asdict(options), **folder.manifest.get("options", {})}
    info = StoreInfo(location=where, size=options.size, num_images=count, source=source,
                     options=recorded, skipped=tuple(skipped))
    write_text(output, INFO_NAME, info.to_json())  # last: it marks the dataset complete
    if not is_url(where):
        _publish(Path(output), Path(where))
    shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(where, count, _report(skipped), len(chunks),
                         sum(chunk["chunk_bytes"] for chunk in chunks), time.perf_counter() - started,
                         resumed, already_prepared=False)


def _optimize(converter: _Converter, inputs: list[int], output: str, workers: int | None,
              chunk_bytes: int, progress: bool, fresh_remote: bool) -> None:
    """Run ``litdata.optimize`` in a child process that leads its own process group.

    LitData's workers and their helper processes do not all end with the main one (a helper
    can wait on a queue for ever, after success too), so the whole group is killed once the
    child returns, and at once on Ctrl-C or SIGTERM here: what LitData has checkpointed
    stays, and the next run continues from it.
    """
    count = available_cpus() if workers is None else max(1, workers)
    arguments = dict(
        inputs=inputs, output_dir=output, chunk_bytes=chunk_bytes, num_workers=min(count, len(inputs)),
        reorder_files=False, keep_data_ordered=True, use_checkpoint=True, verbose=progress,
        start_method="fork", mode="overwrite" if fresh_remote else None,
    )
    if not is_url(output) and (Path(output) / INDEX_NAME).is_file():
        return  # an earlier run's LitData finished after its parent was killed
    if not hasattr(os, "fork") or not hasattr(os, "killpg"):  # Windows: no groups, no fork
        import litdata

        litdata.optimize(converter, **{**arguments, "start_method": None})
        return
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_optimize_in_group, args=(converter, arguments), daemon=False)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        child.start()
        child.join()
    finally:
        # Also after success: a LitData helper can outlive its worker, waiting on a queue.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.join()
        signal.signal(signal.SIGTERM, previous)
    if child.exitcode != 0:
        if not is_url(output) and shutil.disk_usage(Path(output).parent).free < chunk_bytes:
            # LitData's workers report a full disk as text only: say it as the other tools do.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output)
        raise ValueError(f"LitData failed while writing {shown(output)} (exit status {child.exitcode}; "
                         "its message is above); run the same command again to continue")


def _optimize_in_group(converter: _Converter, arguments: dict[str, Any]) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import litdata  # its import starts threads and reads the environment: only here

    litdata.optimize(converter, **arguments)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _read_skips(folder: Path) -> list[SkippedFile]:
    """Every worker's skip log, once per file (a resumed run may have logged one twice)."""
    found: dict[str, SkippedFile] = {}
    for log in sorted(folder.glob("skipped-*.jsonl")):
        for line in log.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            try:
                item = json.loads(line)
            except ValueError:  # the line being written when a run was killed
                continue
            found[item["path"]] = SkippedFile(item["path"], item["reason"], item["detail"], "loading")
    return list(found.values())


def _report(skipped: tuple[SkippedFile, ...] | list[SkippedFile]) -> SkipReport:
    return SkipReport(tuple(sorted((item.path, item.reason) for item in skipped)))


def _publish(output: Path, dst: Path) -> None:
    """Rename the finished ``output`` to ``dst``, replacing an empty or prepared ``dst``."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)  # dst is gone for a moment only; output is complete by now
    os.replace(output, dst)
    shutil.rmtree(old, ignore_errors=True)
