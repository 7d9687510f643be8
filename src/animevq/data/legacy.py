"""The prepared format written by ``animevq prepare`` and the dataset that reads it.

A prepared folder (format version 1)::

    manifest.json    format, version, size, max_aspect, counts, shards, skipped files + reasons
    index.npy        (N,4) int64, one row per image: shard number, byte offset, height, width
    paths.json       the N source paths relative to the source folder, sorted (row i ↔ path i)
    shard-00000.bin  images as raw uint8 (H,W,3) bytes, back to back; ~1 GB per shard

Each image is resized so its short side is ``size`` and centre-cropped so its long side
is at most ``size·max_aspect``, with (long − size) even. Why:

- Raw uint8, memory-mapped: reading an image is a slice of the page cache, no decoding,
  so one core serves thousands of crops a second instead of a few hundred decodes.
- A variable long side rather than a square: the random crop along the long axis (the
  raw folder's training augmentation) keeps its meaning; a stored centre square would
  drop a third of a 2:3 illustration and leave flips as the only augmentation.
- The long side capped (2·size by default keeps 2:3 and 9:16 images whole): a 20000×8
  strip must not become 640000×256.
- The resize box centred and (long − size) even: the centre crop of a stored image
  samples the same source points as the raw folder's validation crop, so validation
  tensors agree with the raw folder's to the last bit except for rare one-level
  roundings (see :func:`~animevq.data.transforms.resize_box`).
- A few large shards: few open files per worker, sequential writes, kind to network
  filesystems that choke on a million small files.

A prepared folder is read as untrusted input: :func:`read_prepared` refuses a manifest,
path list or index file of the wrong structure (the message names the file and says to
re-run ``animevq prepare``), memory-mapping the index to check its header before anything
is allocated. A single index row that cannot be read (outside its shard, no side of the
stored size) is found by one vectorised check; the file is skipped as ``bad_index_row``
and replaced like any bad file, and each read checks its row again.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from animevq.data.dataset import SampleKey, SkipLedger, _seed_of, substitute_order
from animevq.data.images import SkipReason
from animevq.data.names import shown
from animevq.data.transforms import crop_resize, resize_box, to_tensor

FORMAT_NAME = "animevq-prepared"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.npy"
PATHS_NAME = "paths.json"
_INDEX_COLUMNS = 4  # shard, byte offset, height, width
_CHANNELS = 3


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


class SkippedFile(NamedTuple):
    """A source file left out: ``stage`` is "listing" (a refused link, never part of the
    dataset) or "loading" (listed, then found unusable)."""

    path: str
    reason: str  # a SkipReason label, e.g. "truncated"
    detail: str
    stage: str

    @property
    def skip_reason(self) -> SkipReason:
        return SkipReason[self.reason.upper()]


def stored_image(image: Image.Image, size: int, max_aspect: float) -> np.ndarray:
    """RGB image (W,H) → uint8 (H',W',3) with short side ``size`` and long side
    L ≤ size·max_aspect, L − size even, the long axis centre-cropped beyond L.

    The resize box is centred and scaled like the raw folder's crop (short side → size),
    so the centre size×size crop of the result equals ``crop_resize(image, size)`` (up to
    rare one-level roundings: see :func:`~animevq.data.transforms.resize_box`).
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    target = min(math.floor(long * size / short), math.floor(size * max_aspect))
    target = max(size, target - (target - size) % 2)
    span = target * short / size  # source pixels along the long axis that L covers
    start = (long - span) / 2
    if width >= height:
        return np.asarray(resize_box(image, (target, size), (start, 0, start + span, height)))
    return np.asarray(resize_box(image, (size, target), (0, start, width, start + span)))


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``animevq prepare`` (it has a manifest)."""
    return (Path(path) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class PreparedFolder:
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
    def files(self) -> list[str]:
        """Every source file the raw folder's listing would give (stored or skipped while
        loading), sorted: splitting this list makes the split the raw folder's."""
        loading = [item.path for item in self.skipped if item.stage == "loading"]
        return sorted(self.paths + loading)

    @functools.cached_property
    def file_rows(self) -> np.ndarray:
        """(len(files),) int64: each file's row in ``index``, or -1 if it was skipped."""
        row_of = {path: row for row, path in enumerate(self.paths)}
        return np.array([row_of.get(path, -1) for path in self.files], dtype=np.int64)

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


def read_prepared(path: str | os.PathLike[str]) -> PreparedFolder:
    """Read and check the manifest, index and path list of a prepared folder.

    Raises:
        ValueError: not a prepared folder, written by a newer animevq, or damaged
            (missing, truncated or malformed files); the message names the file and says
            to re-run ``animevq prepare``.
    """
    root = Path(path).expanduser().absolute()
    where = shown(root)
    redo = f"re-run `animevq prepare SRC {where} --overwrite`"
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
    return PreparedFolder(root=root, manifest=manifest, paths=paths, index=index, skipped=skipped)


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


class PreparedDataset(Dataset[torch.Tensor]):
    """Images of a prepared folder as float tensors (3,S,S) in [-1,1], S = image_size;
    the same samples as :class:`~animevq.data.ImageFolderDataset` on the source folder.

    Training: a crop at a random position along the long axis and a random horizontal
    flip, drawn from (seed, epoch, index) exactly as the raw dataset draws them; the
    position is rounded to whole stored pixels. Validation: the centre crop. When
    S equals the stored size a crop is an array slice; a smaller S crops the stored
    short-side square and resizes it, as the raw dataset does.

    Shards are memory-mapped on first use in each process (never pickled), so DataLoader
    workers share the page cache instead of copying images. An index row that cannot be
    read (:attr:`PreparedFolder.bad_rows`, or a shard changed since) is recorded in
    ``ledger`` as ``bad_index_row`` and replaced by another image, as a bad file is.
    """

    def __init__(
        self,
        folder: PreparedFolder,
        file_ids: Sequence[int],
        *,
        image_size: int,
        train: bool,
        seed: int = 0,
        random_flip: bool = True,
        ledger: SkipLedger | None = None,
    ) -> None:
        if image_size > folder.size:
            raise ValueError(
                f"{shown(folder.root)} was prepared at size {folder.size}, smaller than "
                f"image_size={image_size}; re-run `animevq prepare "
                f"{shown(folder.manifest.get('source', 'SRC'))} {shown(folder.root)} "
                f"--size {image_size} --overwrite`, or lower image_size"
            )
        self.root = folder.root
        self.shard_files = [str(folder.root / name) for name in folder.shards]
        self.file_ids = np.asarray(file_ids, dtype=np.int64)  # (n,) ids into folder.files
        rows = folder.file_rows[self.file_ids]
        if (rows < 0).any():
            raise ValueError("file_ids include files that were skipped while preparing")
        self.entries = folder.index[rows]  # (n,4) shard, byte offset, height, width
        self.bad = folder.bad_rows[rows]  # (n,) bool
        self.ledger = SkipLedger(len(folder.files)) if ledger is None else ledger
        self.stored_size = folder.size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.random_flip = random_flip
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # each process maps the shards itself
        return state

    def pixels(self, index: int) -> np.ndarray | None:
        """The stored image at ``index``: a read-only uint8 view (H,W,3), or None if its
        index row does not describe one that is there."""
        if self._maps is None:
            self._maps = [np.memmap(file, dtype=np.uint8, mode="r") for file in self.shard_files]
        if self.bad[index]:
            return None
        shard, offset, height, width = (int(value) for value in self.entries[index])
        end = offset + height * width * _CHANNELS
        if not (0 <= shard < len(self._maps) and 0 <= offset <= end <= len(self._maps[shard])
                and min(height, width) == self.stored_size):
            return None  # the shard changed after the folder was checked
        return self._maps[shard][offset:end].reshape(height, width, _CHANNELS)

    def _first_readable(self, index: int) -> np.ndarray:
        """The pixels at ``index`` or, if its row is bad, at a substitute (as the raw
        dataset substitutes), recording each bad row in the ledger."""
        for position in substitute_order(index, len(self), self.seed):
            file_id = int(self.file_ids[position])
            if self.ledger.known_bad(file_id):
                continue
            pixels = self.pixels(position)
            if pixels is not None:
                return pixels
            self.ledger.skip(file_id, SkipReason.BAD_INDEX_ROW)
        raise RuntimeError(
            f"none of the {len(self)} stored images of this split can be read: their rows of "
            f"{shown(self.root / INDEX_NAME)} are damaged; re-run `animevq prepare SRC "
            f"{shown(self.root)} --overwrite`"
        )

    def __getitem__(self, key: int | SampleKey) -> torch.Tensor:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        offset, flip = 0.5, False
        if self.train:  # the same draws, in the same order, as ImageFolderDataset
            rng = random.Random(_seed_of("augment", self.seed, epoch, index))
            offset, flip = rng.random(), rng.random() < 0.5
            flip = flip and self.random_flip
        pixels = self._first_readable(index)  # (H,W,3)
        if self.image_size != self.stored_size:
            image = Image.fromarray(np.asarray(pixels))
            crop = np.asarray(crop_resize(image, self.image_size, offset))  # (S,S,3)
        else:
            size = self.stored_size
            height, width = pixels.shape[:2]
            start = round(offset * (max(height, width) - size))  # (long - size) / 2 for val
            if width > height:
                crop = pixels[:, start : start + size]  # (S,S,3)
            else:
                crop = pixels[start : start + size]
        if flip:
            crop = crop[:, ::-1]
        return to_tensor(crop)  # (3,S,S)
