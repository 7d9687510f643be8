"""How fast a model trains, never what it computes beyond rounding: memory format, fused
kernels and compilation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..config import SpeedOptions

__all__ = ["compiled_parts", "fuse_norms", "speed_up"]


def speed_up(model: Any, speed: SpeedOptions, *, on_cuda: bool) -> None:
    """Put a VQVAEModel (its ``tokenizer`` and ``objective``) in NHWC memory format on CUDA, and
    compile its networks, as ``speed`` asks.

    Compilation is in place (``Module.compile``), so state-dict keys stay the same. The weight
    EMA (``ema_tokenizer``, copied before this; it runs only in validation) and the quantiser
    (it updates buffers in place and costs little) stay eager. For VQ-GAN the
    decoder's head stays eager: the adaptive weight differentiates through its last conv alone,
    which a compiled backward could only do by running the whole decoder's backward.
    """
    if speed.channels_last and on_cuda:
        model.to(memory_format=torch.channels_last)  # what cuDNN's bf16 tensor-core convs want
    if speed.fused_norm and on_cuda:
        fuse_norms(model)
    if speed.compile:
        for module in compiled_parts(model):
            module.compile(mode=speed.compile_mode)


def compiled_parts(model: Any) -> list[torch.nn.Module]:
    """The networks of a VQVAEModel that ``speed.compile`` compiles, each on its own: encoder,
    decoder (its stages only for VQ-GAN), LPIPS and discriminator where present."""
    tokenizer, objective = model.tokenizer, model.objective
    decoder = tokenizer.decoder.stages if objective.discriminator is not None else tokenizer.decoder
    return [m for m in (tokenizer.encoder, decoder, objective.lpips, objective.discriminator) if m is not None]


def fuse_norms(module: torch.nn.Module) -> int:
    """Run ``module``'s GroupNorm + SiLU through ``animevq.kernels`` (Triton); 0 with a warning
    where Triton is not installed (CUDA wheels of PyTorch for Linux bring it)."""
    try:
        from ..kernels.group_norm_silu import fuse_group_norm_silu
    except ImportError as error:
        rank_zero_warn(f"fused GroupNorm + SiLU needs Triton ({error}); running PyTorch's ops. "
                       "Install triton or set --model.speed.fused_norm false to silence this.")
        return 0
    return fuse_group_norm_silu(module)
