"""Loading trained models safely: Lightning ``.ckpt`` files and exported folders.

Checkpoints load with ``torch.load(weights_only=True)``: a file that smuggles pickled
Python objects (whose unpickling could run arbitrary code) is refused before anything in
it runs. Every failure is a :class:`CheckpointError` (a ``ValueError``) that names the
file and says what to do: missing file, not a checkpoint, pickled objects, missing
hyperparameters, or weights that do not fit the model (listing the keys and shapes).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TOKENIZER_PREFIXES",
    "CheckpointError",
    "check_state_dict",
    "load_model",
    "model_kwargs",
    "safe_torch_load",
    "weights_sha256",
]

log = logging.getLogger(__name__)

# The submodules that turn images into codes and back: what exports and hashes cover.
TOKENIZER_PREFIXES = ("encoder.", "quant_conv.", "quantizer.", "post_quant_conv.", "decoder.")
_LIST_LIMIT = 10  # keys shown per category in an incompatibility message
_TUPLE_PARAMS = ("encoder_channels", "decoder_channels", "betas")  # JSON turns tuples into lists
# What torch.load raises for unsafe files (UnpicklingError) and for files that are not
# checkpoints at all (text: KeyError, empty: EOFError, broken zip: RuntimeError, ...).
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


class CheckpointError(ValueError):
    """A model file that cannot be used, with the path and what to do about it."""


def safe_torch_load(path: str | Path, *, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with errors users can act on; ``what``
    names the file's role in messages.

    Raises:
        CheckpointError: missing file, a folder, pickled Python objects, or not a torch file.
    """
    path = Path(path)
    if not path.exists():
        hint = "pass the path of a .ckpt file or an exported folder" if what == "checkpoint" else "check the path"
        raise CheckpointError(f"{what} {path} does not exist; {hint}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a .ckpt file (exported folders load with load_pretrained)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as error:
        text = str(error)
        found = re.search(r"GLOBAL (\S+)", text)
        if found or "Weights only load failed" in text:
            culprit = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {what} {path}: it holds pickled Python objects{culprit} that could run code "
                "when loaded, and animevq only loads tensors and plain values (torch.load weights_only=True). "
                "If you trust the file, re-save it holding only tensors and plain values "
                "(for a model: `animevq export`)."
            ) from error
        raise CheckpointError(f"{what} {path} is not a PyTorch file ({type(error).__name__}: {text[:200]})") from error


def model_kwargs(hparams: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of ``VQVAEModel`` from saved hyperparameters.

    Keys the constructor does not take are dropped (LightningCLI adds ``_instantiator``,
    older versions may have had other knobs). ``use_lpips`` defaults to False: tokenizing
    and most evaluation never need the VGG network, whose weights may not exist here.
    """
    from .lightning_module import VQVAEModel

    accepted = set(inspect.signature(VQVAEModel.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    ignored = sorted(k for k in hparams if k not in accepted and not k.startswith("_"))
    if ignored:
        log.warning("ignoring saved hyperparameters this version does not know: %s", ", ".join(ignored))
    kwargs["use_lpips"] = False
    kwargs.update(overrides)
    for key in _TUPLE_PARAMS:
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, optional: tuple[str, ...] = ("lpips.",)
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys.

    Keys of ``model`` starting with a prefix in ``optional`` may be absent from ``state``
    (the frozen LPIPS network is never saved; exports hold no discriminator).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            more = f" … and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
            parts.append(f"{name} ({len(keys)}): {', '.join(keys[:_LIST_LIMIT])}{more}")
    raise CheckpointError(
        f"{source} does not fit the model built from its hyperparameters; " + "; ".join(parts)
        + ". Was it written by another version of animevq, or by a different model class?"
    )


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any) -> Any:
    """A ``VQVAEModel`` in eval mode from a Lightning ``.ckpt``, an exported folder or its
    ``model.safetensors``. ``overrides`` replace saved hyperparameters (e.g. ``use_lpips=True``).

    Raises:
        CheckpointError: the path is missing, not a checkpoint, unsafe or incompatible.
    """
    from .lightning_module import VQVAEModel

    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        from .export import load_pretrained

        return load_pretrained(path if path.is_dir() else path.parent, map_location=map_location, **overrides)
    checkpoint = safe_torch_load(path, map_location="cpu")
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is a torch file but not a Lightning checkpoint (no 'state_dict'); "
            "pass a .ckpt written by `animevq fit` or an exported folder"
        )
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        raise CheckpointError(
            f"{path} has no 'hyper_parameters', so the model cannot be rebuilt; "
            "it was not saved from VQVAEModel (which calls save_hyperparameters)"
        )
    try:
        model = VQVAEModel(**model_kwargs(hparams, **overrides))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the hyperparameters in {path} do not build a VQVAEModel: {error}") from error
    state = checkpoint["state_dict"]
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=False)  # only the optional lpips.* keys can be absent
    model.batches_seen = int(checkpoint.get("animevq", {}).get("batches_seen", 0))
    return model.to(map_location).eval()


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the tokenizer's tensors (names, dtypes, shapes, bytes, sorted by name).

    It identifies the weights, not the file: a ``.ckpt`` and its export hash alike, so
    codes made with one decode with the other; retraining changes it.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(k for k in state if k.startswith(TOKENIZER_PREFIXES)):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
