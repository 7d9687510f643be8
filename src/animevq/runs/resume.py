"""Exact resumption: a run stopped anywhere continues as if it had not stopped.

:class:`ExactResume` (a callback the CLI adds) saves the global RNG states of torch, NumPy and
Python in the checkpoint and restores them, and makes the datamodule's loaders resumable
(:mod:`animevq.data.resumable`), so a run resumed mid-epoch trains on the rest of that epoch
in order (Lightning restores its counters but not a plain ``DataLoader``'s position).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader

from ..data.resumable import LoaderPosition, ResumableDataLoader, make_resumable
from ..data.streaming import StreamLoader

__all__ = ["ExactResume", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), NumPy and Python, as
    tensors and plain values only (so the checkpoint loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _plain_random_state(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_random_state(value: Any) -> Any:
    return [_plain_random_state(v) for v in value] if isinstance(value, (tuple, list)) else value


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: set the global RNGs back to the captured states."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class ExactResume(pl.Callback):
    """Makes ``--ckpt_path`` resumption continue exactly as if the run had not stopped.

    - Saves the global RNG states in the checkpoint and restores them on load.
    - Makes the datamodule's ``DataLoader`` objects resumable (:func:`make_resumable`) and
      tells the training one, at each epoch's first batch, how many batches Lightning
      counts as done, so a mid-epoch resume trains on the rest of that epoch in order.

    The restore happens before Lightning creates the training iterator; with
    :class:`ResumableDataLoader` nothing draws from the global RNG between there and the
    first batch, just as nothing does between a save and the next batch.
    """

    def __init__(self) -> None:
        self._wrapped: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or self._wrapped is datamodule:
            return
        # Validation loaders too: with persistent workers an uninterrupted run creates their
        # iterator once (under the sanity check's isolated RNG) and a resumed run creates it
        # again; neither may move the global RNG.
        for hook in ("train_dataloader", "val_dataloader"):
            original = getattr(datamodule, hook)

            @functools.wraps(original)  # keeps Lightning's "is the hook overridden?" test truthful
            def resumable(original: Callable[[], Any] = original) -> Any:
                return make_resumable(original())

            setattr(datamodule, hook, resumable)
        self._wrapped = datamodule

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None and stage == "fit":
            for hook in ("train_dataloader", "val_dataloader"):
                self._wrapped.__dict__.pop(hook, None)
            self._wrapped = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop

        def position() -> LoaderPosition:
            # At the epoch's first fetch Lightning has already set `ready` to the batches it
            # will not fetch again (0 unless it restarted mid-epoch).
            return LoaderPosition(trainer.current_epoch, int(loop.epoch_loop.batch_progress.current.ready))

        for loader in CombinedLoader(trainer.train_dataloader).flattened:
            if isinstance(loader, (ResumableDataLoader, StreamLoader)):
                loader.position = position
            else:
                log.warning("the training loader (%s) is not resumable: a run resumed mid-epoch restarts that "
                            "epoch's data order", type(loader).__name__)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
