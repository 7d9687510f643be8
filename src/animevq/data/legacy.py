"""The prepared format of animevq 0.1 (memory-mapped shards), read only to convert it:
``animevq prepare OLD NEW`` turns such a folder into a LitData dataset without decoding the
source images again (they may be gone). Training reads LitData datasets only.

A folder of format version 1::

    manifest.json    format, version, size, max_aspect, counts, shards, skipped files + reasons
    index.npy        (N,4) int64, one row per image: shard number, byte offset, height, width
    paths.json       the N source paths relative to the source folder, sorted (row i ↔ path i)
    shard-00000.bin  images as raw uint8 (H,W,3) bytes, back to back

It is read as untrusted input: :func:`read_legacy` refuses a manifest, path list or index
file of the wrong structure (naming the file), memory-mapping the index to check its header
before anything is allocated; a row that does not describe bytes inside its shard is left
out of the conversion and listed as ``bad_index_row``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from animevq.data.images import SkipReason
from animevq.data.names import shown
from animevq.data.store import SkippedFile

FORMAT_NAME = "animevq-prepared"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.npy"
PATHS_NAME = "paths.json"
_INDEX_COLUMNS = 4  # shard, byte offset, height, width
_CHANNELS = 3


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def is_legacy(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder prepared by animevq 0.1 (it has a manifest.json)."""
    return (Path(path) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class LegacyFolder:
    """What :func:`read_prepared` found: the manifest, the index and the source paths."""

    root: Path
    manifest: dict[str, Any]
    paths: list[str]  # (N,) source paths of the stored images, sorted; row i of index
    index: np.ndarray  # (N,4) int64: shard, byte offset, height, width
    skipped: list[SkippedFile]

    @property
    def size(self) -> int:
        """The short side every image was stored at."""
        return int(self.manifest["size"])

    @property
    def shards(self) -> list[str]:
        return [shard["name"] for shard in self.manifest["shards"]]

    @functools.cached_property
    def bad_rows(self) -> np.ndarray:
        """(N,) bool: rows of ``index`` that cannot be read: a shard that does not exist, a
        shape whose short side is not ``size``, or bytes outside the shard."""
        shard_bytes = np.array([shard["bytes"] for shard in self.manifest["shards"]], np.int64)
        shard, offset, height, width = self.index.T  # (N,) each
        known = (shard >= 0) & (shard < len(shard_bytes))
        available = shard_bytes[np.where(known, shard, 0)]  # (N,) bytes of each row's shard
        # The long side is bounded before multiplying, so garbage cannot overflow int64.
        longest = available.max(initial=0) // (_CHANNELS * self.size)
        shaped = (np.minimum(height, width) == self.size) & (np.maximum(height, width) <= longest)
        nbytes = np.where(shaped, height * width * _CHANNELS, 0)
        inside = (offset >= 0) & (offset <= available - nbytes)
        return ~(known & shaped & inside)

    def row_problem(self, row: int) -> str:
        """What is wrong with index row ``row`` (one of :attr:`bad_rows`), for messages."""
        shard, offset, height, width = (int(value) for value in self.index[row])
        where = f"row {row} ('{shown(self.paths[row])}')"
        if not 0 <= shard < len(self.shards):
            return f"{where}: shard {shard} does not exist ({len(self.shards)} shards)"
        if min(height, width) != self.size:
            return f"{where}: {height}x{width} has no side of the stored size {self.size}"
        size = self.manifest["shards"][shard]["bytes"]
        return (f"{where}: bytes from {offset} ({height}x{width}x3) are outside "
                f"{self.shards[shard]} ({size} bytes)")


def read_legacy(path: str | os.PathLike[str]) -> LegacyFolder:
    """Read and check the manifest, index and path list of a prepared folder.

    Raises:
        ValueError: not a prepared folder, written by a newer animevq, or damaged
            (missing, truncated or malformed files); the message names the file and says
            to re-run ``animevq prepare``.
    """
    root = Path(path).expanduser().absolute()
    where = shown(root)
    redo = "prepare it again from its source folder with `animevq prepare SRC NEW_DST`"
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        paths = json.loads((root / PATHS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{where} is not a readable prepared folder ({error}); {redo}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}/{MANIFEST_NAME} is not an animevq prepared manifest; {redo}")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > FORMAT_VERSION:
        raise ValueError(
            f"{where} was prepared by a newer animevq (format {manifest.get('version')!r}, this "
            f"one reads up to {FORMAT_VERSION}); upgrade animevq or {redo}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"{where}/{MANIFEST_NAME}: {problem}; {redo}")
    count = manifest["num_images"]
    if not (isinstance(paths, list) and len(paths) == count
            and all(isinstance(item, str) for item in paths) and len(set(paths)) == count):
        raise ValueError(f"{where}/{PATHS_NAME} is not a list of {count} distinct paths; {redo}")
    index = _read_index(root / INDEX_NAME, count, redo)
    for shard in manifest["shards"]:
        file = root / shard["name"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise ValueError(
                f"{shown(file)} is missing or has the wrong size (copy cut short?); {redo}"
            )
    skipped = [SkippedFile(**item) for item in manifest["skipped"]]
    return LegacyFolder(root=root, manifest=manifest, paths=paths, index=index, skipped=skipped)


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is malformed in the fields that reading uses, or None."""
    def counts(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_shard(k: int, shard: object) -> bool:
        return (isinstance(shard, dict) and shard.get("name") == shard_name(k)
                and counts(shard.get("bytes")))

    def is_skipped(item: object) -> bool:
        return (isinstance(item, dict) and set(item) == set(SkippedFile._fields)
                and all(isinstance(value, str) for value in item.values())
                and item["reason"] in {reason.label for reason in SkipReason})

    if not (counts(manifest.get("num_images")) and counts(manifest.get("size"))
            and manifest["size"] > 0):
        return "num_images and size must be whole numbers (size > 0)"
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(is_shard(k, shard) for k, shard in enumerate(shards)):
        return "shards must list shard-00000.bin, shard-00001.bin, … in order, each with its bytes"
    skipped = manifest.get("skipped")
    if not isinstance(skipped, list) or not all(is_skipped(item) for item in skipped):
        return f"skipped must list {{{', '.join(SkippedFile._fields)}}} entries with known reasons"
    return None


def _read_index(file: Path, count: int, redo: str) -> np.ndarray:
    """index.npy as (count,4) int64, its header checked through a memory map before the
    rows are read (a forged shape allocates nothing)."""
    try:
        mapped = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{shown(file)} is not a readable index ({error}); {redo}") from error
    if mapped.dtype != np.int64 or mapped.shape != (count, _INDEX_COLUMNS):
        raise ValueError(
            f"{shown(file)} holds {mapped.dtype} {mapped.shape}, not the int64 ({count}, "
            f"{_INDEX_COLUMNS}) rows (shard, offset, height, width) of the manifest; {redo}"
        )
    return np.array(mapped)


def legacy_pixels(folder: LegacyFolder, row: int) -> np.ndarray | None:
    """The stored image of index row ``row``: a uint8 copy (H,W,3), or None where the row
    does not describe bytes inside its shard (:attr:`LegacyFolder.bad_rows`)."""
    if folder.bad_rows[row]:
        return None
    shard, offset, height, width = (int(value) for value in folder.index[row])
    with open(folder.root / folder.shards[shard], "rb") as file:
        file.seek(offset)
        data = file.read(height * width * _CHANNELS)
    if len(data) != height * width * _CHANNELS:
        return None  # the shard was cut short after it was checked
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, _CHANNELS).copy()
