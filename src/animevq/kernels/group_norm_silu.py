"""SiLU(GroupNorm(x)) for channels_last CUDA tensors in four Triton kernels, forward and backward.

Why: in the default model's 256² and 128² ResBlocks, Inductor's GroupNorm + SiLU took about
40 % of a block's forward + backward, at about twice the bytes it must move
(``benchmarks/blocks.py``, BENCHMARKS.md). Here each pass reads the activation at most twice:

    forward   statistics (read x) → normalise + SiLU (read x, write out)
    backward  per-channel sums (read x, dout) → input gradient (read x, dout, write dx)

and autograd saves only x (plus per-sample statistics), not the normalised tensor.

Maths (Wu & He 2018, eq. 1–4; SiLU of Elfwing et al. 2018). Per sample n and group g of
M = (C/G)·H·W elements: x̂ = (x − μ)·σ⁻¹ with σ⁻¹ = 1/√(var + eps) (biased var), y = γ·x̂ + β,
out = y·s(y) with s the logistic function. Backward: dy = dout·s(y)·(1 + y·(1 − s(y))),
dγ = Σ dy·x̂, dβ = Σ dy, and with S₁ = Σ_g γ·dy, S₂ = Σ_g γ·dy·x̂ over the group,
dx = σ⁻¹·(γ·dy − (S₁ + x̂·S₂)/M). All arithmetic is float32 whatever x's dtype; the output
and dx have x's dtype. Variances are merged per tile with Chan et al.'s pairwise formula,
never as E[x²] − E[x]².

Layout: x is (B,C,H,W) with channels_last strides, i.e. a dense (B, H·W, C) array; a tile is
BLOCK_HW rows of all C channels. Not for NCHW tensors or the CPU (``supports`` says).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn

from ..nn.blocks import set_norm_silu_kernel

__all__ = ["group_norm_silu", "supports", "fuse_group_norm_silu", "KERNEL"]

TILE_ELEMENTS = 4096  # a tile of ~4k values keeps every row of C channels in registers
PROGRAMS_PER_SAMPLE = 16  # statistics passes: programs per sample, each looping over tiles


def supports(x: torch.Tensor, groups: int) -> bool:
    """Whether ``group_norm_silu`` takes ``x``: 4-D, floating, channels_last, C divisible by groups.
    On the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and x.dim() == 4 and x.is_floating_point() and x.shape[1] % groups == 0
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last))


def _block_hw(channels: int) -> int:
    return max(1, TILE_ELEMENTS // triton.next_power_of_2(channels))


def _tiles_per_program(hw: int, block_hw: int) -> int:
    return max(1, triton.cdiv(triton.cdiv(hw, block_hw), PROGRAMS_PER_SAMPLE))


@triton.jit
def _channel_stats(x_ptr, mean_ptr, m2_ptr, HW, C, TILES, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (sample, program, channel): mean and sum of squared deviations of its rows."""
    n, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    count = tl.zeros((BLOCK_C,), tl.float32)  # rows merged so far (the same for every channel)
    for t in range(TILES):
        rows = (k * TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        row_ok = rows < HW
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + n * HW * C + rows[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        cnt = tl.sum(row_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(ok, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = tl.maximum(count + cnt, 1.0)
        delta = tile_mean - mean
        mean += delta * (cnt / total)  # Chan, Golub & LeVeque 1979: merge two partial moments
        m2 += tile_m2 + delta * delta * (count * cnt / total)
        count += cnt
    out = (n * tl.num_programs(1) + k) * C + cols
    tl.store(mean_ptr + out, mean, mask=col_ok)
    tl.store(m2_ptr + out, m2, mask=col_ok)


@triton.jit
def _norm_silu(x_ptr, scale_ptr, shift_ptr, out_ptr, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = SiLU(scale·x + shift), scale and shift per (sample, channel)."""
    n, r = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = r * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows[:, None] < HW) & (cols[None, :] < C)
    offs = n * HW * C + rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + n * C + cols, mask=cols < C, other=0.0)
    shift = tl.load(shift_ptr + n * C + cols, mask=cols < C, other=0.0)
    y = x * scale[None, :] + shift[None, :]
    tl.store(out_ptr + offs, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_grad(x, dout, scale, shift):
    y = x * scale[None, :] + shift[None, :]
    s = tl.sigmoid(y)
    return dout * s * (1.0 + y * (1.0 - s))


@triton.jit
def _grad_sums(x_ptr, dout_ptr, scale_ptr, shift_ptr, hat_scale_ptr, hat_shift_ptr, sum_dy_ptr, sum_dyx_ptr,
               HW, C, TILES, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (sample, program, channel): Σ dy and Σ dy·x̂ over its rows (x̂ = hat_scale·x + hat_shift)."""
    n, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = tl.load(scale_ptr + n * C + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + n * C + cols, mask=col_ok, other=0.0)
    hat_scale = tl.load(hat_scale_ptr + n * C + cols, mask=col_ok, other=0.0)
    hat_shift = tl.load(hat_shift_ptr + n * C + cols, mask=col_ok, other=0.0)
    sum_dy = tl.zeros((BLOCK_C,), tl.float32)
    sum_dyx = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(TILES):
        rows = (k * TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        ok = (rows[:, None] < HW) & col_ok[None, :]
        offs = n * HW * C + rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.where(ok, _silu_grad(x, dout, scale, shift), 0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dyx += tl.sum(dy * (x * hat_scale[None, :] + hat_shift[None, :]), axis=0)
    out = (n * tl.num_programs(1) + k) * C + cols
    tl.store(sum_dy_ptr + out, sum_dy, mask=col_ok)
    tl.store(sum_dyx_ptr + out, sum_dyx, mask=col_ok)


@triton.jit
def _grad_input(x_ptr, dout_ptr, scale_ptr, shift_ptr, b_ptr, c_ptr, dx_ptr, HW, C,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = scale·dy + b·x + c with b, c per (sample, channel) (scale = γ·σ⁻¹, the forward's)."""
    n, r = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = r * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows[:, None] < HW) & col_ok[None, :]
    offs = n * HW * C + rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    per = n * C + cols
    scale = tl.load(scale_ptr + per, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + per, mask=col_ok, other=0.0)
    b = tl.load(b_ptr + per, mask=col_ok, other=0.0)
    c = tl.load(c_ptr + per, mask=col_ok, other=0.0)
    dx = scale[None, :] * _silu_grad(x, dout, scale, shift) + b[None, :] * x + c[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(B, C, H·W, BLOCK_HW, BLOCK_C) of a channels_last (B,C,H,W) tensor."""
    B, C, H, W = x.shape
    return B, C, H * W, _block_hw(C), triton.next_power_of_2(C)


def _programs(hw: int, block_hw: int) -> int:
    return triton.cdiv(triton.cdiv(hw, block_hw), _tiles_per_program(hw, block_hw))


@torch.library.custom_op("animevq::gn_channel_stats", mutates_args=())
def _channel_stats_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, HW, block_hw, block_c = _geometry(x)
    mean, m2 = _partials_like(x)
    K = mean.shape[1]
    _channel_stats[(B, K)](x, mean, m2, HW, C, _tiles_per_program(HW, block_hw), BLOCK_HW=block_hw, BLOCK_C=block_c)
    return mean, m2


def _partials_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two empty (B, K, C) float32 tensors: one value per sample, statistics program and channel."""
    B, C, H, W = x.shape
    K = _programs(H * W, _block_hw(C))
    first = x.new_empty((B, K, C), dtype=torch.float32)
    return first, torch.empty_like(first)


@_channel_stats_op.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _partials_like(x)


@torch.library.custom_op("animevq::gn_norm_silu", mutates_args=())
def _norm_silu_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    B, C, HW, block_hw, block_c = _geometry(x)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    _norm_silu[(B, triton.cdiv(HW, block_hw))](x, scale, shift, out, HW, C, BLOCK_HW=block_hw, BLOCK_C=block_c)
    return out


@_norm_silu_op.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("animevq::gn_silu_grad_sums", mutates_args=())
def _grad_sums_op(x: torch.Tensor, dout: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  hat_scale: torch.Tensor, hat_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, HW, block_hw, block_c = _geometry(x)
    sum_dy, sum_dyx = _partials_like(x)
    K = sum_dy.shape[1]
    _grad_sums[(B, K)](x, dout, scale, shift, hat_scale, hat_shift, sum_dy, sum_dyx, HW, C,
                       _tiles_per_program(HW, block_hw), BLOCK_HW=block_hw, BLOCK_C=block_c)
    return sum_dy, sum_dyx


@_grad_sums_op.register_fake
def _(x: torch.Tensor, dout: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
      hat_scale: torch.Tensor, hat_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _partials_like(x)


@torch.library.custom_op("animevq::gn_silu_grad_input", mutates_args=())
def _grad_input_op(x: torch.Tensor, dout: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    B, C, HW, block_hw, block_c = _geometry(x)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    _grad_input[(B, triton.cdiv(HW, block_hw))](x, dout, scale, shift, b, c, dx, HW, C,
                                               BLOCK_HW=block_hw, BLOCK_C=block_c)
    return dx


@_grad_input_op.register_fake
def _(x: torch.Tensor, dout: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
      b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _group_moments(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/√(var+eps)) per (sample, group), each (B, G) float32, from per-tile channel moments."""
    B, C, H, W = x.shape
    mean_kc, m2_kc = _channel_stats_op(x)  # (B, K, C)
    span = _block_hw(C) * _tiles_per_program(H * W, _block_hw(C))  # rows each statistics program covers
    rows = H * W - torch.arange(mean_kc.shape[1], device=x.device) * span
    count = rows.clamp(max=span).float()  # rows per program, (K,)
    mean_kc = mean_kc.unflatten(2, (groups, C // groups))  # (B, K, G, C/G)
    m2_kc = m2_kc.unflatten(2, (groups, C // groups))
    weight = count.view(1, -1, 1, 1)
    total = H * W * (C // groups)
    mean = (mean_kc * weight).sum((1, 3)) / total  # (B, G)
    m2 = m2_kc.sum((1, 3)) + (weight * (mean_kc - mean[:, None, :, None]).square()).sum((1, 3))
    return mean, torch.rsqrt(m2 / total + eps)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G) → (B, C): each group's value for each of its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1).contiguous()


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
        C = x.shape[1]
        mean, rstd = _group_moments(x, groups, eps)
        hat_scale = _per_channel(rstd, C)  # x̂ = hat_scale·x + hat_shift
        hat_shift = -_per_channel(mean * rstd, C)
        gamma, beta = weight.float(), bias.float()
        scale, shift = hat_scale * gamma, hat_shift * gamma + beta  # (B, C)
        ctx.save_for_backward(x, weight, scale, shift, hat_scale, hat_shift, mean, rstd)
        ctx.groups = groups
        return _norm_silu_op(x, scale, shift)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # noqa: ANN205 - autograd's signature
        x, weight, scale, shift, hat_scale, hat_shift, mean, rstd = ctx.saved_tensors
        B, C, H, W = x.shape
        G = ctx.groups
        dout = dout.contiguous(memory_format=torch.channels_last)
        sum_dy, sum_dyx = (s.sum(1) for s in _grad_sums_op(x, dout, scale, shift, hat_scale, hat_shift))  # (B, C)
        gamma = weight.float()
        s1 = (gamma * sum_dy).unflatten(1, (G, C // G)).sum(2)  # Σ_g γ·dy, (B, G)
        s2 = (gamma * sum_dyx).unflatten(1, (G, C // G)).sum(2)  # Σ_g γ·dy·x̂
        total = H * W * (C // G)
        b = _per_channel(-rstd.square() * s2 / total, C)
        c = _per_channel(rstd * (mean * rstd * s2 - s1) / total, C)
        dx = _grad_input_op(x, dout, scale, shift, b, c)  # dx = scale·dy + b·x + c
        return dx, sum_dyx.sum(0).to(weight.dtype), sum_dy.sum(0).to(weight.dtype), None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """``silu(group_norm(x, groups, weight, bias, eps))`` for a channels_last (B,C,H,W) tensor
    (``supports``); the result has x's dtype and layout."""
    if not supports(x, groups):
        raise ValueError(f"group_norm_silu needs a 4-D channels_last tensor with C divisible by {groups}, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    return _GroupNormSiLU.apply(x, weight, bias, groups, eps)


class _Kernel:
    """``group_norm_silu`` as an ``animevq.nn.blocks.NormSiLUKernel``."""

    supports = staticmethod(supports)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 eps: float) -> torch.Tensor:
        return _GroupNormSiLU.apply(x, weight, bias, groups, eps)


KERNEL = _Kernel()


def fuse_group_norm_silu(module: nn.Module) -> int:
    """Let every ``GroupNorm`` in ``module`` run its ``silu`` through ``KERNEL``; returns how many.
    Parameters and state dict are untouched; inputs the kernel does not take run PyTorch's ops."""
    return set_norm_silu_kernel(module, KERNEL)
