"""A ``DataLoader`` that can start an epoch part-way through, for exact resumption
(:class:`~animevq.runs.resume.ExactResume` tells it where the training loop stands)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

__all__ = ["LoaderPosition", "ResumableDataLoader", "make_resumable"]

log = logging.getLogger(__name__)


class LoaderPosition(NamedTuple):
    """Where the training loop stands when an epoch's first batch is fetched."""

    epoch: int
    batches_done: int  # batches of this epoch already trained on (0 unless resuming mid-epoch)


class _SkipFirst:
    """An index sampler whose next iteration drops the first ``loader._skip`` batches of
    indices. Only indices are dropped: the skipped images are never decoded."""

    def __init__(self, inner: Any, loader: ResumableDataLoader) -> None:
        self.inner, self.loader = inner, loader

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader._skip = self.loader._skip, 0
        it = iter(self.inner)
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it


class _DeferredIterator:
    """Starts the DataLoader's iterator at the first ``next()``, not at ``iter()``.

    Lightning calls ``iter()`` on the training loader before it sets the sampler's epoch
    and before it has restored where the epoch stands; worker processes would already
    have taken indices by then. Starting late lets both reach the sampler first.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start_epoch()
        return next(self.iterator)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can start an epoch part-way through, for exact resumption.

    Set :attr:`position` to a function returning the :class:`LoaderPosition` of the
    training loop (:class:`ExactResume` does); at each epoch's first batch the loader skips
    ``batches_done`` batches of indices. Worker processes get a base seed made from
    ``(torch.initial_seed(), epoch)`` instead of a draw from the global RNG, so creating an
    iterator never moves the global RNG and the workers' seeds survive a resume.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_resumable()

    def _init_resumable(self) -> None:
        self._skip = 0
        self._epochs_started = 0  # the epoch when no training loop tells it
        self.position: Callable[[], LoaderPosition] | None = None
        if self.generator is None:  # allowed: DataLoader only freezes the sampling arguments
            self.generator = torch.Generator()
            self._own_generator = True
        else:
            self._own_generator = False

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        return _DeferredIterator(self)

    def _start_epoch(self) -> Iterator[Any]:
        where = self.position() if self.position is not None else LoaderPosition(self._epochs_started, 0)
        self._epochs_started += 1
        self._skip = where.batches_done
        if self._own_generator:
            text = f"{torch.initial_seed()}:{where.epoch}".encode()
            self.generator.manual_seed(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1)
        if where.batches_done:
            log.info("resuming epoch %d at batch %d", where.epoch, where.batches_done)
        return DataLoader.__iter__(self)


def make_resumable(loader: Any) -> Any:
    """Turn a plain ``DataLoader`` into a :class:`ResumableDataLoader` in place (its class
    changes; nothing else does) and return it. Other objects are returned unchanged."""
    if type(loader) is DataLoader:
        loader.__class__ = ResumableDataLoader
        loader._init_resumable()
    return loader
