"""Weights as files: the error users see, the state-dict check and the weights hash."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "check_state_dict", "state_sha256"]

_LIST_LIMIT = 10  # keys shown per category in an incompatibility message


class CheckpointError(ValueError):
    """A model file that cannot be used, with the path and what to do about it."""


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, optional: tuple[str, ...] = ()
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


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors (names, dtypes, shapes, bytes, sorted by name)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
