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

from animevq.data.dataset import SampleKey, _seed_of
from animevq.data.images import SkipReason
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


def read_prepared(path: str | os.PathLike[str]) -> PreparedFolder:
    """Read and check the manifest, index and path list of a prepared folder.

    Raises:
        ValueError: not a prepared folder, written by a newer animevq, or damaged
            (missing or truncated files); the message says to re-run ``animevq prepare``.
    """
    root = Path(path).expanduser().absolute()
    redo = f"re-run `animevq prepare SRC {root} --overwrite`"
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        paths = json.loads((root / PATHS_NAME).read_text(encoding="utf-8"))
        index = np.load(root / INDEX_NAME, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{root} is not a readable prepared folder ({error}); {redo}") from error
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{root / MANIFEST_NAME} is not an animevq prepared manifest; {redo}")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{root} was prepared by a newer animevq (format {manifest['version']}, this one "
            f"reads up to {FORMAT_VERSION}); upgrade animevq or {redo}"
        )
    expected = (int(manifest["num_images"]), _INDEX_COLUMNS)
    if index.shape != expected or index.dtype != np.int64 or len(paths) != expected[0]:
        raise ValueError(f"{root}: index {index.shape} does not match the manifest; {redo}")
    for shard in manifest["shards"]:
        file = root / shard["name"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise ValueError(f"{file} is missing or has the wrong size (copy cut short?); {redo}")
    skipped = [SkippedFile(**item) for item in manifest["skipped"]]
    return PreparedFolder(root=root, manifest=manifest, paths=paths, index=index, skipped=skipped)


class PreparedDataset(Dataset[torch.Tensor]):
    """Images of a prepared folder as float tensors (3,S,S) in [-1,1], S = image_size;
    the same samples as :class:`~animevq.data.ImageFolderDataset` on the source folder.

    Training: a crop at a random position along the long axis and a random horizontal
    flip, drawn from (seed, epoch, index) exactly as the raw dataset draws them; the
    position is rounded to whole stored pixels. Validation: the centre crop. When
    S equals the stored size a crop is an array slice; a smaller S crops the stored
    short-side square and resizes it, as the raw dataset does.

    Shards are memory-mapped on first use in each process (never pickled), so DataLoader
    workers share the page cache instead of copying images.
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
    ) -> None:
        if image_size > folder.size:
            raise ValueError(
                f"{folder.root} was prepared at size {folder.size}, smaller than "
                f"image_size={image_size}; re-run `animevq prepare "
                f"{folder.manifest.get('source', 'SRC')} {folder.root} --size {image_size} "
                "--overwrite`, or lower image_size"
            )
        self.root = folder.root
        self.shard_files = [str(folder.root / name) for name in folder.shards]
        self.file_ids = np.asarray(file_ids, dtype=np.int64)  # (n,) ids into folder.files
        rows = folder.file_rows[self.file_ids]
        if (rows < 0).any():
            raise ValueError("file_ids include files that were skipped while preparing")
        self.entries = folder.index[rows]  # (n,4) shard, byte offset, height, width
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

    def pixels(self, index: int) -> np.ndarray:
        """The stored image at ``index``: a read-only uint8 view (H,W,3)."""
        if self._maps is None:
            self._maps = [np.memmap(file, dtype=np.uint8, mode="r") for file in self.shard_files]
        shard, offset, height, width = (int(value) for value in self.entries[index])
        flat = self._maps[shard][offset : offset + height * width * _CHANNELS]
        return flat.reshape(height, width, _CHANNELS)

    def __getitem__(self, key: int | SampleKey) -> torch.Tensor:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        offset, flip = 0.5, False
        if self.train:  # the same draws, in the same order, as ImageFolderDataset
            rng = random.Random(_seed_of("augment", self.seed, epoch, index))
            offset, flip = rng.random(), rng.random() < 0.5
            flip = flip and self.random_flip
        pixels = self.pixels(index)  # (H,W,3)
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
