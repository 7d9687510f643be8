"""Convolutional building blocks shared by the encoder and decoder.

Shapes use one alphabet: B batch, C channels, H/W image sides.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["CHANNEL_SUMS", "ChannelSumsNormSiLU", "norm_groups", "group_norm", "group_norm_silu_by_channel_sums",
           "GroupNorm", "NormSiLUKernel", "ResBlock", "Downsample", "Upsample", "set_norm_silu_kernel",
           "upsample_conv3x3"]

MAX_GROUPS = 32  # the usual GroupNorm setting (Wu & He 2018) for widths >= 32
MIN_CHANNELS_PER_GROUP = 4  # fewer channels per group makes GroupNorm's statistics noisy
GROUP_NORM_EPS = 1e-6  # as in the VQGAN / LDM autoencoders


def norm_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` and keeps
    at least ``MIN_CHANNELS_PER_GROUP`` channels per group (1 for tiny widths).

    A hard-coded 32 fails for the 8- or 16-channel models used in tests.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    limit = max(1, min(max_groups, channels // MIN_CHANNELS_PER_GROUP))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward passes the gradient on in channels_last layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("animevq::channels_last_copy", mutates_args=())
def _channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """A channels_last copy. As a custom op it is opaque to Inductor, which must hand it its
    input in the strides that input had when traced, and cannot fuse it away."""
    return x.clone(memory_format=torch.channels_last)


@_channels_last_copy.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


class _RealignedGrad(_ChannelsLastGrad):
    """``_ChannelsLastGrad`` whose backward copies through ``_channels_last_copy``: where the
    traced gradient already has channels_last strides, ``contiguous`` is a no-op and
    Inductor may still lay the gradient out NCHW."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.animevq.channels_last_copy(grad)


class NormSiLUKernel(Protocol):
    """A fused ``silu(group_norm(x))`` (forward and backward) for the inputs it ``supports``;
    ``animevq.kernels`` has the Triton one."""

    def supports(self, x: torch.Tensor, groups: int) -> bool: ...

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> torch.Tensor: ...


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) that, under ``torch.compile``,
    keeps a channels_last input's layout in its output and its input gradient; and whose
    ``silu`` runs a fused kernel where one is set (``silu_kernel``) and takes the input.

    ATen's CUDA kernels normalise ``input.contiguous()``: traced, the norm's output and
    input gradient carry NCHW strides. Inductor then writes the SiLU output twice (NCHW to
    save for backward, channels_last for the next conv) and cuDNN copies both the saved
    NCHW input and the NCHW gradient back to channels_last in every backward — 37 copy
    kernels, 8.3 ms of a 70 ms VQ-VAE step on an H100. Asking for channels_last on both
    sides lets Inductor write them so in the kernels it generates anyway. Eager mode runs
    ATen's kernels untouched.
    """

    silu_kernel: NormSiLUKernel | None = None  # set per module; not part of the state dict

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(self(x))``: the activation every ResBlock applies after its norms."""
        kernel = self.silu_kernel
        if kernel is not None and self.affine and kernel.supports(x, self.num_groups):
            return kernel(x, self.weight, self.bias, self.num_groups, self.eps)
        return nn.functional.silu(self(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.compiler.is_compiling() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if not keep:
            return super().forward(x)
        if x.requires_grad:
            x = _ChannelsLastGrad.apply(x)
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(norm_groups(channels), channels, eps=GROUP_NORM_EPS, affine=True)


def set_norm_silu_kernel(module: nn.Module, kernel: NormSiLUKernel | None) -> int:
    """Let every ``GroupNorm`` in ``module`` run its ``silu`` through ``kernel`` (None: PyTorch's
    ops again); returns how many. Parameters and state dict are untouched."""
    norms = [m for m in module.modules() if isinstance(m, GroupNorm)]
    for norm in norms:
        norm.silu_kernel = kernel
    return len(norms)


def group_norm_silu_by_channel_sums(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                                    eps: float) -> torch.Tensor:
    """``silu(group_norm(x, groups, weight, bias, eps))`` for x (N,C,H,W), the same function in
    ops a compiler can lay out for channels_last: each (sample, channel)'s sums over H·W (a
    reduction along the axis a channels_last tensor stores contiguously, where
    ``group_norm``'s reduction over (C/G,H,W) reads C/G values per pixel), each group's mean
    and variance from its channels' (the law of total variance: no second pass over x), and
    one multiply-add and SiLU per element. Each channel's sums are taken about one of its own
    values, which leaves its variance unchanged and keeps the sum of squares from cancelling
    when the mean is large against the spread.

    Computes in float32 (float64 for float64 input) and returns x's dtype. Under CUDA autocast
    ``group_norm`` returns float32 instead; a ResBlock's next op is a convolution, which
    rounds its input to bf16 either way, so the values it sees are the same.
    """
    n, c, h, w = x.shape
    width = c // groups
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    pivot = xf[:, :, :1, :1].detach()  # (N,C,1,1): a shift, not a parameter of the function
    d = xf - pivot
    mean_d = d.mean((2, 3))  # (N,C)
    var_c = (d * d).mean((2, 3)) - mean_d * mean_d
    mean_c = (mean_d + pivot.view(n, c)).view(n, groups, width)
    mean_g = mean_c.mean(2, keepdim=True)  # (N,G,1)
    var_g = var_c.view(n, groups, width).mean(2, keepdim=True) + (mean_c - mean_g).square().mean(2, keepdim=True)
    gain = torch.rsqrt(var_g.clamp_min(0) + eps) * weight.to(xf.dtype).view(groups, width)  # (N,G,C/G)
    scale = gain.view(n, c, 1, 1)
    shift = (bias.to(xf.dtype).view(groups, width) - mean_g * gain).view(n, c, 1, 1)
    return nn.functional.silu(xf * scale + shift).to(x.dtype)


class ChannelSumsNormSiLU:
    """``group_norm_silu_by_channel_sums`` as a ``NormSiLUKernel``, under ``torch.compile`` only
    (eager mode runs ATen's fused kernels, which are faster there)."""

    @staticmethod
    def supports(x: torch.Tensor, groups: int) -> bool:
        return (torch.compiler.is_compiling() and x.dim() == 4 and x.is_floating_point()
                and x.shape[1] % groups == 0 and x.numel() > 0)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> torch.Tensor:
        return group_norm_silu_by_channel_sums(x, weight, bias, groups, eps)


CHANNEL_SUMS = ChannelSumsNormSiLU()


class ResBlock(nn.Module):
    """Pre-activation residual block: GN → SiLU → Conv3×3 → GN → SiLU → Conv3×3, plus a
    skip path (a 1×1 conv when the width changes). (B,C_in,H,W) → (B,C_out,H,W)."""

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1.silu(x))
        h = self.conv2(self.norm2.silu(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Conv4×4 stride 2 (the seed's encoder stage entry): (B,C_in,H,W) → (B,C_out,H/2,W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Nearest ×2 then a 3×3 conv, per output phase: output row 2i+a of the upsampled image
# sees input rows i-1+a and i+a only, the conv's three row taps folded onto two.
# _PHASE_TAPS[a][p][k] says which tap k (0..2) lands on row p (0, 1) for phase a.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out,C_in,3,3) kernel of "nearest ×2 → Conv3×3" → (4·C_out,C_in,2,2): one 2×2 kernel
    for each output phase (a, b), output channel (2a + b)·C_out + o."""
    taps = weight.new_tensor(_PHASE_TAPS)
    phased = torch.einsum("apk,oikl,bql->aboipq", taps, weight, taps)
    return phased.reshape(-1, weight.shape[1], 2, 2)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Exactly ``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``
    with 16 instead of 36 multiply-adds per input pixel and weight (2.25× fewer FLOPs), and
    without materialising the 4× larger upsampled input.

    One 2×2 conv with padding 1 gives every phase (a, b) on an (H+1)×(W+1) grid, phase
    (a, b)'s values at offset (a, b); one gather interleaves them. The result has the
    input's memory format; under channels_last each phase's channels are read contiguously.
    """
    N, _, H, W = x.shape
    C = weight.shape[0]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    kernel = phase_weights(weight)
    if channels_last:  # as the input, or cuDNN converts the kernel each call
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    y = nn.functional.conv2d(x, kernel, padding=1)  # (N, 4C, H+1, W+1)
    if channels_last:
        y = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, C))  # (N, H+1, W+1, a, b, C): a view
        rows = [torch.stack([y[:, a : a + H, b : b + W, a, b] for b in (0, 1)], dim=3) for a in (0, 1)]
        out = torch.stack(rows, dim=2).reshape(N, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
    else:
        y = y.unflatten(1, (2, 2, C))  # (N, a, b, C, H+1, W+1)
        rows = [torch.stack([y[:, a, b, :, a : a + H, b : b + W] for b in (0, 1)], dim=-1) for a in (0, 1)]
        out = torch.stack(rows, dim=3).reshape(N, C, 2 * H, 2 * W)
    # The bias in the conv's dtype, as conv2d adds it: under bf16 autocast a float32 bias
    # would promote the output, and with it the decoder's residual stream, to float32.
    return out if bias is None else out + bias.to(out.dtype).view(1, C, 1, 1)


class Upsample(nn.Module):
    """Nearest ×2 then Conv3×3: (B,C_in,H,W) → (B,C_out,2H,2W).

    The parameter is the 3×3 conv of the architecture (checkpoints are unchanged); with
    ``phase_conv`` (default) the forward runs the exact low-resolution form
    (``upsample_conv3x3``), otherwise the literal interpolate-then-conv.

    ``realign_grad`` is for an upsampling followed by a ResBlock, under ``torch.compile``
    with channels_last: the gradient arriving there (the block's two branches summed) is
    laid out NCHW by Inductor, and the phase gather's backward reads it with a stride of
    H·W between channels — 2.2 ms for the 128² level of a VQ-GAN step on an H100. The
    gradient is then copied into channels_last first. Eager mode is untouched.
    """

    def __init__(self, in_channels: int, out_channels: int, *, phase_conv: bool = True,
                 realign_grad: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.phase_conv = phase_conv
        self.realign_grad = realign_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.phase_conv:
            return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        if self.realign_grad and torch.compiler.is_compiling() and x.is_contiguous(memory_format=torch.channels_last):
            out = _RealignedGrad.apply(out)
        return out
