"""Checkpoint files: one safe load, one verify, one atomic write, and what 0.1 wrote.

Checkpoints load with ``torch.load(weights_only=True)``: a file that smuggles pickled Python
objects (whose unpickling could run arbitrary code) is refused before anything in it runs.
Every failure is a :class:`CheckpointError` (a ``ValueError``) that names the file and says
what to do. :func:`load_tokenizer` turns a checkpoint or an exported folder into a
:class:`~animevq.nn.Tokenizer`, without Lightning.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..nn.config import TokenizerConfig
from ..nn.tokenizer import Tokenizer, image_side
from ..nn.weights import CheckpointError

__all__ = [
    "EMA_PREFIX",
    "TOKENIZER_PREFIX",
    "CheckpointError",
    "atomic_replace",
    "fsync_dir",
    "load_tokenizer",
    "checkpoint_tokenizer",
    "ema_tokenizer_state",
    "migrate_state_dict",
    "read_checkpoint",
    "os_error",
    "safe_torch_load",
    "tokenizer_state",
    "verify_checkpoint",
]

DATAMODULE_HPARAMS = "datamodule_hyper_parameters"  # where Lightning saves a data module's arguments
TOKENIZER_PREFIX = "tokenizer."  # VQVAEModel.tokenizer's keys in a checkpoint's state dict
EMA_PREFIX = "ema_tokenizer."  # its weight EMA (optimization.ema_decay > 0): what the tools use
# animevq 0.1 kept the tokenizer's parts, the discriminator and LeCam's averages at the top
# level of VQVAEModel; 0.2 composes them: old prefix → new prefix.
_V01_LAYOUT = {
    **{p: TOKENIZER_PREFIX + p for p in ("encoder.", "quant_conv.", "quantizer.", "post_quant_conv.", "decoder.")},
    "discriminator.": "objective.discriminator.",
    "lecam.": "objective.lecam.",
    "lpips.": "objective.lpips.",
}
# What torch.load raises for files that are not checkpoints at all (text: KeyError, empty:
# EOFError, broken zip: RuntimeError, ...).
_NOT_TORCH = (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


class _Unreadable(Exception):
    """Not a loadable torch file; the message says why."""


def _reason(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"


def _load(path: Path, what: str, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a pickle payload is refused here, the one place."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, *_NOT_TORCH) as error:
        text = str(error)
        if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            culprit = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {what} {path}: it holds pickled Python objects{culprit} that could run code "
                "when loaded, and animevq only loads tensors and plain values (torch.load weights_only=True). "
                "If you trust the file, re-save it holding only tensors and plain values "
                "(for a model: `animevq export`)."
            ) from None
        raise _Unreadable(_reason(error)) from error


def safe_torch_load(path: str | Path, *, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors users can act on;
    ``what`` names the file's role in messages.

    Raises:
        CheckpointError: missing file, a folder, pickled Python objects, or not a torch file.
    """
    path = Path(path)
    if not path.exists():
        hint = "pass the path of a .ckpt file or an exported folder" if what == "checkpoint" else "check the path"
        raise CheckpointError(f"{what} {path} does not exist; {hint}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a .ckpt file (exported folders load with from_pretrained)")
    try:
        return _load(path, what)
    except _Unreadable as error:
        raise CheckpointError(f"{what} {path} is not a PyTorch file ({error})") from None


def _damage(path: Path) -> str | None:
    """Why ``path`` is not a whole, loadable checkpoint, or None if it is (every zip member's
    CRC-32, then a ``weights_only`` load with memory mapping, so tensors are not read twice).

    Raises:
        CheckpointError: the file is whole but holds pickled Python objects.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # reads every member and checks its CRC-32
        if broken is not None:
            return f"its member {broken} fails its CRC check"
        _load(path, "checkpoint", mmap=True)
    except _Unreadable as error:
        return str(error)
    except (OSError, zipfile.BadZipFile) as error:
        return _reason(error)
    return None


def verify_checkpoint(path: str | Path, *, previous_name: str) -> None:
    """Check that ``path`` is a whole checkpoint before anything is built from it.

    Raises:
        CheckpointError: naming the damage and ``previous_name`` in the same folder (the
            checkpoint written before this one) and whether that one is intact; or refusing
            a file that holds pickled objects (nothing in it has run).
    """
    path = Path(path)
    damage = _damage(path)
    if damage is None:
        return
    previous = path.with_name(previous_name)
    if previous.exists() and previous != path:
        try:
            previous_damage = _damage(previous)
        except CheckpointError:
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


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, final: Path, *, keep_previous: Path | None = None) -> None:
    """Flush ``tmp`` to disk and rename it over ``final`` (same folder, so the rename is atomic).

    With ``keep_previous``, the file ``final`` held before survives under that name: it is
    hard-linked there first, so at every instant one of the two names holds a whole file.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if keep_previous is not None and final.exists():
        staging = keep_previous.with_name(f".{keep_previous.name}.tmp")  # hidden, like every temporary
        staging.unlink(missing_ok=True)
        os.link(final, staging)
        os.replace(staging, keep_previous)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``: torch.save's zip writer, closed after a failed write, raises
    a RuntimeError ("unexpected pos") whose context is the ENOSPC."""
    for _ in range(4):
        if error is None or isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def migrate_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """A VQVAEModel state dict in 0.2's layout; one written by 0.1 has its keys renamed."""
    if any(k.startswith(TOKENIZER_PREFIX) for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        old = next((p for p in _V01_LAYOUT if key.startswith(p)), None)
        out[_V01_LAYOUT[old] + key[len(old):] if old else key] = value
    return out


def tokenizer_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The (live, trained) tokenizer's own state dict inside a VQVAEModel's (either layout)."""
    n = len(TOKENIZER_PREFIX)
    return {k[n:]: v for k, v in migrate_state_dict(state).items() if k.startswith(TOKENIZER_PREFIX)}


def ema_tokenizer_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of the tokenizer's weight EMA inside a VQVAEModel's; empty without one."""
    n = len(EMA_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}


def load_tokenizer(path: str | Path, *, map_location: str | torch.device = "cpu") -> Tokenizer:
    """A :class:`Tokenizer` in eval mode from a Lightning ``.ckpt`` (its weight EMA where it has
    one, see :func:`checkpoint_tokenizer`), an exported folder or its ``model.safetensors``.

    Raises:
        CheckpointError: the path is missing, not a checkpoint, unsafe or incompatible.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return Tokenizer.from_pretrained(path if path.is_dir() else path.parent, map_location=map_location)
    return checkpoint_tokenizer(read_checkpoint(path), source=path).to(map_location)


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """A Lightning checkpoint, loaded safely, checked whole and holding a ``state_dict``.

    Raises:
        CheckpointError: the path is missing, not a checkpoint, unsafe or corrupt.
    """
    path = Path(path)
    checkpoint = safe_torch_load(path)
    damage = _damage(path) if zipfile.is_zipfile(path) else None  # every member's CRC: a flipped byte
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt ({damage}); use an earlier checkpoint")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path} is a torch file but not a Lightning checkpoint (no 'state_dict'); "
            "pass a .ckpt written by `animevq fit` or an exported folder"
        )
    return checkpoint


def checkpoint_tokenizer(checkpoint: Mapping[str, Any], *, source: str | Path) -> Tokenizer:
    """The tokenizer (eval mode, CPU) of a checkpoint :func:`read_checkpoint` read from ``source``:
    its weight EMA where it has one (the weights validated during training), else its weights."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        raise CheckpointError(
            f"{source} has no 'hyper_parameters', so the model cannot be rebuilt; "
            "it was not saved from VQVAEModel (which calls save_hyperparameters)"
        )
    try:
        config = TokenizerConfig.from_hparams(hparams)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the hyperparameters in {source} do not build a tokenizer: {error}") from error
    state = ema_tokenizer_state(checkpoint["state_dict"]) or tokenizer_state(checkpoint["state_dict"])
    tokenizer = Tokenizer.from_state(config, state, source=str(source))
    data = checkpoint.get(DATAMODULE_HPARAMS)  # what Lightning saved of the data module: its image_size
    tokenizer.training_image_size = image_side(data.get("image_size")) if isinstance(data, Mapping) else None
    return tokenizer
