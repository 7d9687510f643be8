"""Streaming a prepared dataset (:mod:`animevq.data.store`) with LitData.

- :class:`ImageStream` is a ``litdata.StreamingDataset`` whose items are training tensors:
  LitData picks the items (chunks shuffled per epoch from ``seed``, disjoint across ranks
  and workers, downloaded ahead into a bounded local cache); the crop and flip of each item
  are drawn from (seed, epoch, item index), so they survive a resume and any worker count.
- :func:`split_stream` splits it into train and validation by whole chunks, in an order
  fixed by ``seed``: every epoch reads each chunk once, and the split never changes.
- :class:`StreamLoader` is a ``litdata.StreamingDataLoader`` that starts an epoch part-way
  through, exactly, from the batches Lightning counts as done
  (:class:`~animevq.runs.resume.ExactResume` tells it), with any ``num_workers``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.utilities.train_test_split import subset_dataset

from animevq.data.dataset import _seed_of
from animevq.data.names import shown
from animevq.data.resumable import LoaderPosition
from animevq.data.store import INFO_NAME, StoreInfo, is_url
from animevq.data.transforms import stored_crop

__all__ = ["ImageStream", "StreamLoader", "num_items", "open_stream", "split_stream"]

log = logging.getLogger(__name__)


class ImageStream(StreamingDataset):
    """A prepared dataset's images as float tensors (3,S,S) in [-1,1], S = ``image_size``.

    Training: a crop at a random position along the long axis and a random horizontal
    flip, drawn from (seed, epoch, item index); validation: the centre crop. An item that
    is not a stored image of the recorded size (a damaged chunk) is refused naming it.
    """

    def __init__(self, info: StoreInfo, *, image_size: int, seed: int, random_flip: bool,
                 cache_dir: str | None, max_cache_size: str | None) -> None:
        # batch_decode=0: one item deserialized per read. LitData's "auto" picks a window of
        # items for numpy data and, with the shuffle inside a chunk, decoded (and copied) about
        # 40 items for each one used: 8x slower than 0.1's shards per core.
        super().__init__(info.location, cache_dir=cache_dir, shuffle=True, seed=seed,
                         max_cache_size=max_cache_size, batch_decode=0)
        self.info = info
        self.image_size = image_size
        self.stored_size = info.size
        self.augment_seed = seed
        self.random_flip = random_flip
        self.train = True

    def __getitem__(self, index: Any) -> torch.Tensor:
        pixels = super().__getitem__(index)
        number = int(getattr(index, "index", index))  # a ChunkedIndex from iteration, or an int
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3
                and pixels.shape[2] == 3 and min(pixels.shape[:2]) == self.stored_size):
            described = getattr(pixels, "shape", type(pixels).__name__)
            raise ValueError(
                f"item {number} of {shown(self.info.location)} is {described}, not a stored image "
                f"with short side {self.stored_size}; the dataset is damaged: re-run `animevq "
                f"prepare {shown(self.info.source)} {shown(self.info.location)} --overwrite`"
            )
        offset, flip = 0.5, False
        if self.train:  # the same draws, in the same order, as ImageFolderDataset
            rng = random.Random(_seed_of("augment", self.augment_seed, self.current_epoch, number))
            offset, flip = rng.random(), rng.random() < 0.5
            flip = flip and self.random_flip
        return stored_crop(pixels, self.image_size, offset, flip)  # (3,S,S)


def open_stream(info: StoreInfo, *, image_size: int, seed: int, random_flip: bool = True,
                cache_dir: str | None = None, max_cache_size: str | None = None) -> ImageStream:
    """Open the LitData dataset that ``info`` describes, checking that it holds the images
    the description counts.

    Raises:
        ValueError: ``image_size`` exceeds the stored size, or LitData's index does not
            hold ``info.num_images`` items (a copy cut short).
    """
    where = shown(info.location)
    if image_size > info.size:
        raise ValueError(
            f"{where} was prepared at size {info.size}, smaller than image_size={image_size}; "
            f"re-run `animevq prepare {shown(info.source)} {where} --size {image_size} "
            "--overwrite`, or lower image_size"
        )
    if cache_dir is not None and not is_url(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
    try:
        stream = ImageStream(info, image_size=image_size, seed=seed, random_flip=random_flip,
                             cache_dir=cache_dir, max_cache_size=max_cache_size)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{where} has no readable LitData index beside {INFO_NAME} ({error}); "
                         f"re-run `animevq prepare {shown(info.source)} {where} --overwrite`") from error
    found = num_items(stream)
    if found != info.num_images:
        raise ValueError(f"{where}: LitData's index holds {found} images, {INFO_NAME} says "
                         f"{info.num_images} (a copy cut short?); copy it again or re-run "
                         f"`animevq prepare {shown(info.source)} {where} --overwrite`")
    return stream


def num_items(stream: StreamingDataset) -> int:
    """Images in ``stream`` (or in a split of it), over every rank."""
    return sum(end - start for start, end in stream.region_of_interest)


def split_stream(stream: ImageStream, val_split: float, seed: int) -> tuple[ImageStream, ImageStream]:
    """(train, val) of ``stream``: whole chunks in an order fixed by ``seed`` go to
    validation until it holds round(val_split·N) images (the last one cut), at least one
    of each when N ≥ 2 and val_split > 0. Validation is read in order, without shuffling."""
    sizes = [end - start for start, end in stream.region_of_interest]  # items per chunk
    total = sum(sizes)
    wanted = round(val_split * total)
    if val_split > 0 and total >= 2:
        wanted = min(max(wanted, 1), total - 1)
    starts = np.cumsum([0] + sizes[:-1])  # global index of each chunk's first item
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(_seed_of("split", seed)))
    val: list[int] = []
    for chunk in order.tolist():
        if len(val) >= wanted:
            break
        take = min(sizes[chunk], wanted - len(val))
        val.extend(range(int(starts[chunk]), int(starts[chunk]) + take))
    chosen = np.zeros(total, dtype=bool)
    chosen[val] = True
    train_set = subset_dataset(stream, np.flatnonzero(~chosen).tolist())
    val_set = subset_dataset(stream, sorted(val)) if val else subset_dataset(stream, [])
    val_set.train = False
    val_set.set_shuffle(False)
    return train_set, val_set


class StreamLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose epochs are numbered by the training loop and that
    can start one part-way through.

    Set :attr:`position` to a function returning the :class:`LoaderPosition` of the
    training loop (:class:`~animevq.runs.resume.ExactResume` does). At each epoch's first
    batch the loader asks it: the epoch fixes LitData's shuffle (so epoch 5 of a resumed
    run is epoch 5 of an uninterrupted one), and ``batches_done`` batches are skipped by
    LitData's own replay, which knows which worker yields which batch. Lightning's
    checkpointing of loader states is left out (``state_dict = None``): it records the
    batch Lightning has prefetched as done, one too many.
    """

    state_dict = None  # type: ignore[assignment]  # Lightning's _Stateful check then skips us
    load_state_dict = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())  # workers' seeds: never the global RNG
        super().__init__(*args, **kwargs)
        self.position: Callable[[], LoaderPosition] | None = None
        self._epochs_started = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning has
        # restored where the epoch stands.
        where = self.position() if self.position is not None else LoaderPosition(self._epochs_started, 0)
        self._epochs_started = where.epoch + 1
        # The workers' base seed, drawn from this generator when the iterator starts, then
        # depends on (the run's seed, epoch) only: creating an iterator never moves the global
        # RNG, and a resumed epoch gives its workers the seeds an uninterrupted one did.
        self.generator.manual_seed(_seed_of(torch.initial_seed(), where.epoch))
        dataset = self.dataset
        dataset.reset_state_dict()
        self.restore = False
        self.current_epoch = where.epoch  # LitData's __iter__ counts it up to epoch + 1
        if where.batches_done:
            dataset.set_epoch(where.epoch + 1)
            workers = max(self.num_workers, 1)
            yielded = where.batches_done * self.batch_size
            StreamingDataLoader.load_state_dict(self, {
                "dataset": dataset.state_dict(yielded, self.num_workers, self.batch_size),
                "current_epoch": where.epoch + 1, "num_samples_yielded": yielded,
                "latest_worker_idx": (where.batches_done - 1) % workers,
            })
            log.info("resuming epoch %d at batch %d", where.epoch, where.batches_done)
        yield from super().__iter__()
