"""What keeps a long run safe: exact resumption, checkpoint checks and non-finite steps.

- :class:`ExactResume` (a callback the CLI adds): the RNG states of torch, NumPy and Python
  travel in the checkpoint, and a run stopped in the middle of an epoch continues with the
  very next batch of that epoch instead of restarting the epoch's order (Lightning restores
  its counters but not the data position of a plain ``DataLoader``).
- :func:`verify_checkpoint`: a truncated or corrupt file is found before Lightning loads it,
  and the error names the previous good checkpoint.
- :func:`architecture_differences`: what makes a checkpoint unusable for resuming a model.
- :func:`check_free_space`: a checkpoint folder that cannot hold two checkpoints fails
  before training starts, not hours later.
- :class:`NonFiniteGuardMixin` (part of ``VQVAEModel``): a NaN/inf loss skips its step;
  too many in a row raise :class:`NonFiniteLossError`.
- :func:`any_rank` and :class:`HostSigtermCheck` (a callback the CLI adds): under DDP a
  SIGTERM on any rank stops every rank at the same batch, and the ranks agree on it
  through the CPU, so the check around each batch never makes the host wait for the GPU
  (Lightning's own check does, through NCCL and ``.item()``).

docs/reliability.md lists every promise and the test that proves it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import random
import shutil
import signal
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError

__all__ = [
    "ARCHITECTURE_KEYS",
    "AgreedSigterm",
    "EXIT_SIGTERM",
    "ExactResume",
    "HostSigtermCheck",
    "LoaderPosition",
    "NonFiniteGuardMixin",
    "NonFiniteLossError",
    "ResumableDataLoader",
    "any_rank",
    "architecture_differences",
    "capture_rng_state",
    "check_free_space",
    "estimate_checkpoint_bytes",
    "make_resumable",
    "restore_rng_state",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + 15  # what a shell reports for a process ended by SIGTERM
# Hyperparameters that fix the shapes or the kind of the saved tensors: a checkpoint written
# with other values cannot be resumed (its weights would not fit, or mean something else).
ARCHITECTURE_KEYS = (
    "in_channels", "latent_channels", "encoder_channels", "decoder_channels", "num_res_blocks",
    "num_embeddings", "embedding_dim",
)
# Derived switches: (label, function of the hyperparameters) — e.g. VQ-VAE vs VQ-GAN.
_DERIVED_KEYS: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("lambda_gan > 0 (VQ-GAN)", lambda hp: float(hp.get("lambda_gan", 0.0)) > 0),
    ("decay > 0 (EMA codebook)", lambda hp: float(hp.get("decay", 0.99)) > 0),
    ("l2_normalize_codes", lambda hp: bool(hp.get("l2_normalize_codes", False))),
    ("disc_norm", lambda hp: hp.get("disc_norm", "batch") if float(hp.get("lambda_gan", 0.0)) > 0 else None),
    ("lecam_weight > 0", lambda hp: float(hp.get("lecam_weight", 0.0)) > 0 and float(hp.get("lambda_gan", 0.0)) > 0),
)
# Checkpoint bytes per trainable parameter byte: the weight and Adam's two moments.
_ADAM_COPIES = 3
MIN_FREE_CHECKPOINTS = 2.0  # the new file is written beside the old one before the rename
COMFORTABLE_FREE_CHECKPOINTS = 5.0  # last + previous + temp + best-k + its replacement


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for more training batches in a row than allowed."""


# ---------------------------------------------------------------------------- RNG states
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


# ---------------------------------------------------------------------------- data position
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
            if isinstance(loader, ResumableDataLoader):
                loader.position = position
            else:
                log.warning("the training loader (%s) is not resumable: a run resumed mid-epoch restarts that "
                            "epoch's data order", type(loader).__name__)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])


# ---------------------------------------------------------------------------- SIGTERM under DDP
_host_group: tuple[Any, Any] | None = None  # (the default group it belongs to, a gloo group)


def _cpu_group() -> Any:
    """A process group that reduces CPU tensors: the default one when it has gloo, else a
    gloo group over every rank, made once per default group (collectively: the first
    :func:`any_rank` call of each rank makes it)."""
    global _host_group
    if "gloo" in str(dist.get_backend()):
        return None  # the default group (gloo, or "cpu:gloo,cuda:nccl")
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        _host_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _host_group[1]


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over every rank of ``torch.distributed`` (``flag`` itself without it).

    A collective: every rank must call it at the same point. It reduces a CPU tensor over
    gloo, so it waits for the other ranks' hosts but never for a GPU; the same question
    asked through NCCL and read back with ``.item()`` would make the host wait until the
    GPU has drained its queue, every time it is asked.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


class AgreedSigterm(SIGTERMException):
    """SIGTERM that every rank raises at the same point, after agreeing on it (so a
    collective, such as writing a checkpoint, is still safe in ``on_exception``)."""


class HostSigtermCheck(pl.Callback):
    """Under DDP: every rank stops at the same batch when any rank receives SIGTERM, and
    agreeing on it costs no GPU synchronisation.

    Lightning 2.6 does it differently, in two places this callback replaces for the length
    of each ``fit``:

    - Before every training batch it broadcasts rank 0's flag through NCCL and reads it back
      with ``.item()``: the host waits for the GPU to finish the previous batch before it
      may queue the next, so the host's launch time is added to every step (two H100s:
      66 ms per step against 57 ms of GPU work; BENCHMARKS.md). Here :func:`any_rank`
      (a CPU all-reduce over gloo) asks every rank instead, before and after each training
      batch and after each validation batch, and all ranks raise :class:`AgreedSigterm`
      together (Lightning's loops would each stop at their own batch).
    - Its SIGTERM handler broadcasts too, from inside the handler, wherever each rank
      happens to be, which need not pair with any collective of the other ranks. Here the
      handler only records the signal, where Lightning's own per-rank tests do not see it
      (and, under Lightning's subprocess launcher, passes it on to the other local ranks,
      as Lightning's does).

    Under one process it does nothing; a piece that Lightning lacks is left alone. The CLI
    adds it; add it to a ``Trainer`` of your own for multi-GPU runs.
    """

    def __init__(self) -> None:
        self._active = False
        self._received = False  # set by the swapped handler; only the agreements read it
        self._loop: Any = None
        self._handler: tuple[list[Any], int, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = trainer.world_size > 1
        self._received = False
        if not self._active:
            return
        loop = trainer.fit_loop.epoch_loop
        if callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
            loop._broadcast_sigterm_tensor = functools.partial(self._stop_if_any, trainer)  # shadows the method
            self._loop = loop
        self._quiet_signal_handler(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            self._stop_if_any(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active:
            self._stop_if_any(trainer)

    def _stop_if_any(self, trainer: pl.Trainer) -> None:
        if any_rank(self._received or trainer.received_sigterm):
            raise AgreedSigterm()

    def _quiet_signal_handler(self, trainer: pl.Trainer) -> None:
        """Swap Lightning's SIGTERM notifier, inside the handler it registered, for one that
        records the signal without a collective, where only this callback's agreements read
        it: Lightning's loops test the flag it keeps (``trainer.received_sigterm``) on each
        rank alone, and would stop a rank the others are not stopping with."""
        try:
            from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
        except ImportError:  # another Lightning layout: leave its handler alone
            return
        handlers = getattr(signal.getsignal(signal.SIGTERM), "signal_handlers", None)
        notifier = getattr(_SignalConnector, "_sigterm_notifier_fn", None)
        if not isinstance(handlers, list) or notifier is None:
            return

        def record(signum: int, frame: Any) -> None:
            log.info("rank %d received SIGTERM", trainer.global_rank)
            if not self._received and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # Lightning's subprocess launcher: the other local ranks
            self._received = True

        for i, handler in enumerate(handlers):
            if getattr(handler, "__func__", None) is notifier:
                self._handler = (handlers, i, handler)
                handlers[i] = record
                return

    def _restore(self) -> None:
        self._active = False
        if self._loop is not None:
            self._loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._loop = None
        if self._handler is not None:
            handlers, i, handler = self._handler
            handlers[i] = handler
            self._handler = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


# ---------------------------------------------------------------------------- checkpoints
class _Unsafe(Exception):
    """The file is whole but holds pickled objects that ``weights_only`` refuses."""


def _damage(path: Path) -> str | None:
    """Why ``path`` is not a whole, loadable checkpoint, or None if it is.

    Raises:
        _Unsafe: the file is intact but holds pickled Python objects.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # reads every member and checks its CRC-32
        if broken is not None:
            return f"its member {broken} fails its CRC check"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise _Unsafe(str(error).splitlines()[0][:200]) from error
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'unreadable'}"
    return None


def verify_checkpoint(path: str | Path, *, previous_name: str = "previous.ckpt") -> None:
    """Check that ``path`` is a whole checkpoint (every zip member's CRC-32, then a
    ``weights_only`` load with memory mapping, so tensors are not read twice).

    Raises:
        CheckpointError: naming the damage and ``previous_name`` in the same folder — the
            checkpoint written before this one — and whether that one is intact; or, for
            a file holding pickled objects, refusing it (nothing in it has run).
    """
    path = Path(path)
    try:
        damage = _damage(path)
    except _Unsafe as error:
        raise CheckpointError(
            f"refusing to resume from {path}: it holds pickled Python objects that could run code when "
            f"loaded ({error}); animevq checkpoints hold only tensors and plain values"
        ) from None
    if damage is None:
        return
    previous = path.with_name(previous_name)
    if previous.exists() and previous != path:
        try:
            previous_damage = _damage(previous)
        except _Unsafe:
            previous_damage = "it holds pickled Python objects"
        if previous_damage is None:
            hint = f"The previous checkpoint {previous} is intact: resume from it with --ckpt_path {previous}"
        else:
            hint = f"The previous checkpoint {previous} is damaged too ({previous_damage}); start a new run"
    else:
        hint = f"There is no previous checkpoint ({previous} does not exist); start a new run"
    raise CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({damage}). {hint}, or pass another checkpoint "
        "with --ckpt_path."
    )


def _normalise(value: Any) -> Any:
    return tuple(_normalise(v) for v in value) if isinstance(value, (list, tuple)) else value


def architecture_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: checkpoint A, now B"`` for each architecture setting that differs.

    Keys missing from ``saved`` (older checkpoints) are not compared.
    """
    differences = []
    for key in ARCHITECTURE_KEYS:
        if key in saved and key in current and _normalise(saved[key]) != _normalise(current[key]):
            differences.append(f"{key}: checkpoint {_normalise(saved[key])}, now {_normalise(current[key])}")
    for label, derive in _DERIVED_KEYS:
        before, now = derive(saved), derive(current)
        if before != now:
            differences.append(f"{label}: checkpoint {before}, now {now}")
    return differences


def estimate_checkpoint_bytes(module: torch.nn.Module, *, exclude: tuple[str, ...] = ("lpips.",)) -> int:
    """Bytes a Lightning checkpoint of ``module`` trained with Adam takes, roughly:
    trainable parameters three times (weights and two moments), everything else once."""
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.startswith(exclude):
            continue
        copies = _ADAM_COPIES if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad else 1
        total += tensor.numel() * tensor.element_size() * copies
    return total


def check_free_space(folder: Path, checkpoint_bytes: int) -> None:
    """Fail if ``folder`` cannot hold ``MIN_FREE_CHECKPOINTS`` checkpoints; warn below
    ``COMFORTABLE_FREE_CHECKPOINTS``.

    Raises:
        OSError: with the folder, the free space and the estimated checkpoint size.
    """
    free = shutil.disk_usage(folder).free
    mib = 2**20
    sizes = f"{free / mib:.1f} MiB free in {folder}, a checkpoint takes about {checkpoint_bytes / mib:.1f} MiB"
    if free < MIN_FREE_CHECKPOINTS * checkpoint_bytes:
        raise OSError(
            f"not enough disk space for checkpoints: {sizes} and writing one needs room for two. "
            "Free some space or choose another --run_dir."
        )
    if free < COMFORTABLE_FREE_CHECKPOINTS * checkpoint_bytes:
        log.warning("little disk space for checkpoints: %s; the run may fail when saving", sizes)


# ---------------------------------------------------------------------------- non-finite losses
class NonFiniteGuardMixin:
    """Skips training batches whose loss is NaN or infinite. Mixed into ``VQVAEModel``,
    whose ``quantizer``, ``discriminator``, ``lecam``, ``usage_history``, ``batches_seen``
    and hyperparameter ``max_nonfinite_steps`` it uses.

    Two ways to skip, chosen when training starts, alike in what a skipped batch changes
    (nothing: weights, optimiser state, codebook and every buffer stay as they were):

    * On the device, without a host synchronisation (when every optimiser is fused Adam, no
      float16 loss scaler is in use and gradients are not accumulated; the usual GPU run).
      The batch runs to the end; each optimiser gets the verdict as ``found_inf`` (fused
      Adam then leaves parameters and moments untouched) and buffers the step changed are
      put back with ``torch.where``. Streaks and counts live on the device and are read by
      :meth:`settle_nonfinite` on logging steps, before checkpoints and at epoch ends: the
      warning, ``train/skipped_nonfinite`` and the stop after too many bad batches in a row
      come there, up to ``log_every_n_steps`` batches late, and a skipped batch counts as
      a step of the learning-rate schedule.
    * On the host otherwise: :meth:`nonfinite_guard` reads the verdict at once; on a bad
      batch automatic optimisation (VQ-VAE) returns :meth:`skipped_step_loss` and
      :meth:`optimizer_step` does not step (returning None, Lightning's own way to skip, is
      refused under DDP); manual optimisation (VQ-GAN) returns early.

    ``training_step`` calls :meth:`_snapshot_quantizer`, the forward, then
    :meth:`nonfinite_guard`, and ``after_train_batch`` calls :meth:`_finish_guarded_batch`.
    """

    hparams: Any
    quantizer: torch.nn.Module
    usage_history: torch.Tensor
    batches_seen: int

    def setup_nonfinite_guard(self) -> None:
        self.nonfinite_streak = 0  # batches in a row whose loss was NaN/inf
        self.nonfinite_total = 0  # such batches skipped in this run, resumes included
        self._quantizer_snapshot: list[torch.Tensor] | None = None
        self._kmeans_checked_before = False
        self._skip_optimizer_step = False
        self._on_device = False  # the guard decides on the device (see the class docstring)
        self._verdict: torch.Tensor | None = None  # this batch's: 1.0 skip, 0.0 step (on the device)
        self._device_counts: dict[str, torch.Tensor] = {}
        self.last_skipped_batch = -1  # as far as settled

    def _guarded_buffers(self) -> list[torch.Tensor]:
        """Buffers a training batch updates: the quantiser's EMA state, the discriminator's
        BatchNorm statistics (it sees the reconstruction before the loss is known) and
        LeCam's averages."""
        modules = [self.quantizer, getattr(self, "discriminator", None), getattr(self, "lecam", None)]
        return [b for m in modules if m is not None for b in m.buffers()]

    def start_nonfinite_guard(self, optimizers: list[torch.optim.Optimizer], loss_scaler: Any,
                              accumulate_grad_batches: int) -> None:
        """Choose how to skip (see the class docstring); called when training starts."""
        self._on_device = (
            self.hparams.max_nonfinite_steps is not None
            and all(getattr(o, "defaults", {}).get("fused") for o in optimizers)
            and loss_scaler is None
            and accumulate_grad_batches == 1
        )
        if self._on_device:
            device = self.usage_history.device
            self._device_counts = {
                "streak": torch.zeros((), dtype=torch.long, device=device),
                "pending": torch.zeros((), dtype=torch.long, device=device),  # bad since the last settle
                "last_bad": torch.full((), -1, dtype=torch.long, device=device),
                "over_at": torch.full((), -1, dtype=torch.long, device=device),  # batch that broke the limit
            }
        self._guarded_optimizers = list(optimizers)

    def stop_nonfinite_guard(self) -> None:
        """Read what the device counted, and take the verdict off the optimisers."""
        try:
            self.settle_nonfinite()
        finally:
            self._clear_found_inf()
            self._on_device = False

    def _clear_found_inf(self) -> None:
        for opt in getattr(self, "_guarded_optimizers", []):
            if hasattr(opt, "found_inf"):
                del opt.found_inf

    def _snapshot_quantizer(self) -> None:
        """Copy the state a batch updates: the forward updates it before the loss is known."""
        if self.hparams.max_nonfinite_steps is None:
            return
        self._quantizer_snapshot = [b.detach().clone() for b in self._guarded_buffers()]
        self._kmeans_checked_before = self.quantizer._kmeans_checked

    def nonfinite_guard(self, loss: torch.Tensor) -> bool:
        """True if the batch's step may proceed: ``loss`` is finite on every rank, or the
        verdict is left to the device.

        Call it once per training batch, after the forward and before any backward. On the
        host (see the class docstring), False means the batch is already accounted for:
        the buffers it updated (:meth:`_guarded_buffers`) are back to their state at the
        start of ``training_step``, ``batches_seen`` has advanced, ``train/skipped_nonfinite`` is
        logged; the caller must skip backward, optimizer steps and ``after_train_batch``.
        After more than ``max_nonfinite_steps`` such batches in a row it raises
        :class:`NonFiniteLossError` instead (the last good checkpoint stays:
        ``LastCheckpoint`` writes nothing during a run of them).

        On the host it costs one synchronisation (and, under DDP, one tiny all-reduce so
        every rank decides alike); with ``max_nonfinite_steps=None`` it returns True at no cost.
        """
        limit = self.hparams.max_nonfinite_steps
        if limit is None:
            return True
        # A k-means initialisation sets a host-side flag a device verdict could not undo.
        if self._on_device and (self._kmeans_checked_before or not self.quantizer.kmeans_init):
            self._record_verdict(loss, limit)
            return True
        finite = bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._verdict = None
        self._clear_found_inf()
        if finite:
            self.nonfinite_streak = 0
            return True
        if self._quantizer_snapshot is not None:
            for buffer, saved in zip(self._guarded_buffers(), self._quantizer_snapshot):
                buffer.copy_(saved)
            self.quantizer._kmeans_checked = self._kmeans_checked_before
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        batch = self.batches_seen
        self.last_skipped_batch = batch
        self.usage_history[batch % self.hparams.usage_window] = 0  # this batch used no codes
        self.batches_seen += 1
        if self.nonfinite_streak > limit:
            raise NonFiniteLossError(self._nonfinite_message(batch, self.nonfinite_streak))
        self._report_skipped(f"non-finite loss at batch {batch} ({self.nonfinite_streak} in a row, "
                             f"{self.nonfinite_total} in all): step skipped")
        return False

    def _record_verdict(self, loss: torch.Tensor, limit: int) -> None:
        """The device half of the guard: no host synchronisation (NCCL's all-reduce neither)."""
        bad = (~torch.isfinite(loss.detach()).all()).to(torch.float32)
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank alike
        for opt in self._guarded_optimizers:
            opt.found_inf = bad  # fused Adam: no update, step count unchanged
        self._verdict = bad
        skip = bad.bool()
        c, batch = self._device_counts, self.batches_seen
        c["streak"] = torch.where(skip, c["streak"] + 1, 0)
        c["pending"] += skip
        c["last_bad"] = torch.where(skip, batch, c["last_bad"])
        c["over_at"] = torch.where((c["over_at"] < 0) & (c["streak"] > limit), batch, c["over_at"])

    def _finish_guarded_batch(self, counts: torch.Tensor) -> torch.Tensor:
        """After a batch decided on the device: put back what a skipped batch changed.
        Returns the batch's code counts for the usage window (zeros if it was skipped)."""
        if self._verdict is None:
            return counts
        skip = self._verdict.bool()
        if self._quantizer_snapshot is not None:
            for buffer, saved in zip(self._guarded_buffers(), self._quantizer_snapshot):
                buffer.copy_(torch.where(skip, saved, buffer))
        self._verdict = None
        return torch.where(skip, 0.0, counts)

    def settle_nonfinite(self) -> None:
        """Read the device's counts (one host synchronisation): warn and log skipped
        batches, and raise :class:`NonFiniteLossError` after too many in a row."""
        if not self._on_device:
            return
        c = self._device_counts
        streak, pending, last_bad, over_at = torch.stack([c["streak"], c["pending"], c["last_bad"],
                                                          c["over_at"]]).tolist()
        c["pending"].zero_()
        self.nonfinite_streak = streak
        if pending == 0:
            return
        self.nonfinite_total += pending
        self.last_skipped_batch = last_bad
        if over_at >= 0:
            raise NonFiniteLossError(self._nonfinite_message(over_at, self.hparams.max_nonfinite_steps + 1))
        where = f"at batch {last_bad}" if pending == 1 else f"in {pending} batches up to batch {last_bad}"
        self._report_skipped(f"non-finite loss {where} ({streak} in a row, {self.nonfinite_total} in all): "
                             f"step{'' if pending == 1 else 's'} skipped")

    def _report_skipped(self, message: str) -> None:
        if self._trainer is not None and self.trainer.is_global_zero:
            log.warning(message)
            for logger in self.loggers:
                logger.log_metrics({"train/skipped_nonfinite": float(self.nonfinite_total)}, step=self.batches_seen)

    def skipped_step_loss(self) -> torch.Tensor:
        """A loss whose gradient is exactly zero for every trainable parameter (so DDP's
        all-reduce runs as usual and accumulated gradients are unchanged), and a note to
        :meth:`optimizer_step` not to step."""
        self._skip_optimizer_step = True
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([(p.reshape(-1)[:1] * 0.0).sum() for p in params]).sum()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, unless the batch's loss was non-finite (see :meth:`skipped_step_loss`)."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._skip_optimizer_step = False
        loss = optimizer_closure()  # training_step and backward, as the optimizer would run them
        if self._skip_optimizer_step:
            self._skip_optimizer_step = False
            return None
        return super().optimizer_step(epoch, batch_idx, optimizer, lambda: loss)

    def _nonfinite_message(self, batch: int, streak: int) -> str:
        first = batch - streak + 1
        where = "no checkpoint was written yet"
        if self._trainer is not None:
            from .checkpointing import LastCheckpoint

            for callback in self.trainer.callbacks:
                if isinstance(callback, LastCheckpoint) and callback.last_saved_batch is not None:
                    where = f"the last good checkpoint is {callback.path} (batch {callback.last_saved_batch})"
        return (
            f"the loss was NaN or infinite for {streak} training batches in a row "
            f"(batches {first}–{batch}; max_nonfinite_steps={self.hparams.max_nonfinite_steps}), so the run stops; "
            f"{where}. Lower learning_rate, set grad_clip_norm, train in precision 32 or bf16-mixed, or check "
            "the data, then resume with --ckpt_path."
        )
