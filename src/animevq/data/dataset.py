"""The image-folder dataset, its epoch-aware sampler, and the shared skip ledger.

Design of the skip accounting: DataLoader workers are separate processes, so a counter
incremented inside ``__getitem__`` would be lost. Instead every file has one int8 slot in a
tensor in shared memory (:class:`SkipLedger`): 0 not tried, 1 loaded, else a
:class:`~animevq.data.images.SkipReason`, plus a "tried this epoch" flag. Workers write
their file's slot (idempotent: a file is bad or not), the main process reads the ledger at
epoch end. It works for any ``num_workers``, fork or spawn, persistent workers or not, and
keeps batches plain (B,3,S,S) tensors. A file found bad is never decoded again.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from animevq.data.images import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageSkipped,
    SkipReason,
    load_image,
)
from animevq.data.names import shown
from animevq.data.transforms import crop_resize, to_tensor

log = logging.getLogger(__name__)

_UNTRIED, _LOADED = 0, 1
# Random substitutes tried for a bad file before a linear scan; a scan always terminates.
_RANDOM_SUBSTITUTES = 8
# Files tried, beyond the split's, to count what is wrong with a folder where nothing decodes.
_FOLDER_CHECK = 10_000


class SampleKey(NamedTuple):
    """What :class:`EpochSampler` yields: a dataset position and the epoch it is drawn
    in, so augmentation depends on (seed, epoch, index) only, whatever worker runs it."""

    index: int
    epoch: int


def _seed_of(*parts: object) -> int:
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def substitute_order(index: int, count: int, seed: int) -> Iterator[int]:
    """Positions to try for item ``index`` of ``count``: itself, then random substitutes
    fixed by (seed, index), then every other position in order (so the scan terminates)."""
    yield index
    rng = random.Random(_seed_of("substitute", seed, index))
    for _ in range(min(_RANDOM_SUBSTITUTES, count - 1)):
        yield rng.randrange(count)
    for step in range(1, count):
        yield (index + step) % count


class EpochSampler(Sampler[SampleKey]):
    """Shuffles ``num_samples`` positions with a permutation fixed by (seed, epoch).

    Lightning calls :meth:`set_epoch` before each epoch (also through its DDP wrapper), so
    a resumed run continues exactly; used bare, every ``iter()`` starts the next epoch.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            generator = torch.Generator().manual_seed(_seed_of("order", self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return iter([SampleKey(index, epoch) for index in order])


class PathTable:
    """Many paths in two NumPy buffers instead of a list of ``str``.

    Forked DataLoader workers share the parent's memory copy-on-write, but reading a
    Python object writes its reference count, so a list of a million paths is slowly
    copied into every worker (pytorch/pytorch#13246). Flat arrays are never written.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [path.encode("utf-8", "surrogateescape") for path in paths]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        lengths = np.fromiter((len(item) for item in encoded), dtype=np.int64, count=len(encoded))
        self._ends = np.cumsum(lengths)  # (N,) end offset of each path

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        start = int(self._ends[index - 1]) if index > 0 else 0
        raw = self._bytes[start : int(self._ends[index])].tobytes()
        return raw.decode("utf-8", "surrogateescape")


class SkipLedger:
    """Per-file load outcome in shared memory, visible to every DataLoader worker."""

    def __init__(self, num_files: int) -> None:
        self.status = torch.zeros(num_files, dtype=torch.int8).share_memory_()  # (N,)
        self.tried = torch.zeros(num_files, dtype=torch.bool).share_memory_()  # (N,)

    def epoch_codes(self) -> torch.Tensor:
        """(N,) int32: the skip reason of every file tried since :meth:`reset_epoch`, else 0."""
        codes = self.status.to(torch.int32)
        return torch.where(self.tried & (codes > _LOADED), codes, 0)

    def merge(self, codes: torch.Tensor) -> None:
        """Record skip reasons found elsewhere (other ranks) so counts here are global."""
        found = codes.cpu() > _LOADED
        self.status[found] = codes.cpu()[found].to(torch.int8)

    def reset_epoch(self) -> None:
        self.tried.zero_()

    def skip(self, file_id: int, reason: SkipReason) -> None:
        """Record that ``file_id`` was found unusable this epoch."""
        self.tried[file_id] = True
        self.status[file_id] = int(reason)

    def known_bad(self, file_id: int) -> bool:
        """Whether ``file_id`` was found unusable before; if so it counts for this epoch."""
        if int(self.status[file_id]) <= _LOADED:
            return False
        self.tried[file_id] = True
        return True


@dataclass(frozen=True)
class SkipReport:
    """Files skipped, as (relative path, reason label) pairs sorted by path."""

    files: tuple[tuple[str, str], ...]

    @classmethod
    def from_codes(cls, paths: Sequence[str], codes: torch.Tensor) -> SkipReport:
        """Build from (N,) codes as in :meth:`SkipLedger.epoch_codes`."""
        bad = torch.nonzero(codes > _LOADED).flatten().tolist()
        return cls(tuple((paths[i], SkipReason(int(codes[i])).label) for i in bad))

    @property
    def counts(self) -> dict[str, int]:
        """Reason label → number of files, most frequent first."""
        return dict(Counter(reason for _, reason in self.files).most_common())

    @property
    def total(self) -> int:
        return len(self.files)

    def message(self, when: str = "this epoch", max_examples: int = 3) -> str:
        """E.g. ``skipped 3 files this epoch: 1 truncated (a.jpg), 2 not_an_image (b.png,
        c.png)``, at most ``max_examples`` names per reason."""
        parts = []
        for reason, count in self.counts.items():
            names = [shown(path) for path, label in self.files if label == reason]
            examples = ", ".join(names[:max_examples]) + (", …" if count > max_examples else "")
            parts.append(f"{count} {reason} ({examples})")
        plural = "" if self.total == 1 else "s"
        return f"skipped {self.total} file{plural} {when}: " + ", ".join(parts)


class ImageFolderDataset(Dataset[torch.Tensor]):
    """Images ``root/paths[file_ids[i]]`` as float tensors (3,S,S) in [-1,1], S=image_size.

    Training: a square crop of side min(W,H) at a random position along the long axis,
    resized to S (= resize short side, random crop) and a random horizontal flip, drawn
    from (seed, epoch, index). Validation: the centred crop, no flip. A bad file is
    replaced by a deterministically chosen good one and recorded in ``ledger``.
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        file_ids: Sequence[int],
        ledger: SkipLedger,
        *,
        image_size: int,
        train: bool,
        seed: int = 0,
        random_flip: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        self.root = root
        self.paths = PathTable(paths)
        self.file_ids = np.asarray(file_ids, dtype=np.int64)  # (n,) ids into paths/ledger
        self.ledger = ledger
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.file_ids)

    def __getitem__(self, key: int | SampleKey) -> torch.Tensor:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = None
        for position in substitute_order(index, len(self), self.seed):
            image = self._try_load(position)
            if image is not None:
                break
        if image is None:
            raise self._nothing_decodes()
        if not self.train:
            return to_tensor(crop_resize(image, self.image_size, offset=0.5))  # (3,S,S)
        rng = random.Random(_seed_of("augment", self.seed, epoch, index))
        offset, flip = rng.random(), rng.random() < 0.5
        crop = crop_resize(image, self.image_size, offset=offset)
        if self.random_flip and flip:  # in Pillow: cheaper than a torch op in a busy process
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(crop)  # (3,S,S)

    def _nothing_decodes(self) -> RuntimeError:
        """The error for a split of which no file decodes, counted over the whole folder: the
        other split's untried files are tried too (up to ``_FOLDER_CHECK`` of them)."""
        untried = [i for i in range(len(self.paths)) if int(self.ledger.status[i]) == _UNTRIED][:_FOLDER_CHECK]
        for file_id in untried:
            try:
                load_image(self.root / self.paths[file_id], max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                           min_side=self.min_side, target_size=self.image_size)
                self.ledger.status[file_id] = _LOADED
            except ImageSkipped as skip:
                self.ledger.status[file_id] = int(skip.reason)
        codes = self.ledger.status.tolist()
        checked = sum(code != _UNTRIED for code in codes)
        usable = codes.count(_LOADED)
        reasons = Counter(SkipReason(code).label for code in codes if code > _LOADED)
        listing = ", ".join(f"{n} {label}" for label, n in reasons.most_common())
        of = f"{len(codes)}" if checked == len(codes) else f"{checked} checked of the {len(codes)}"
        if usable == 0:
            return RuntimeError(f"none of the {of} image files under {shown(self.root)} could be decoded ({listing}); "
                                "fix or remove them, or point --data.data_dir at another folder")
        split = "training" if self.train else "validation"
        return RuntimeError(f"none of the {len(self)} image files of the {split} split under {shown(self.root)} could "
                            f"be decoded, though {usable} of the folder's {of} can ({listing}); fix or remove the bad "
                            "ones, or change --data.val_split")

    def _try_load(self, position: int) -> Image.Image | None:
        file_id = int(self.file_ids[position])
        self.ledger.tried[file_id] = True
        status = int(self.ledger.status[file_id])
        if status > _LOADED:
            return None  # known bad: don't decode it again
        path = self.root / self.paths[file_id]
        try:
            image = load_image(
                path, max_pixels=self.max_pixels, max_bytes=self.max_bytes, min_side=self.min_side,
                target_size=self.image_size,
            )
        except ImageSkipped as skip:
            self.ledger.status[file_id] = int(skip.reason)
            log.debug("skipping %s", skip)
            return None
        if status == _UNTRIED:
            self.ledger.status[file_id] = _LOADED
        return image
