"""Where a training step's time goes, block by block: one ResBlock of the default model at
each of its resolutions, forward + backward, compiled, against its two floors.

    python benchmarks/blocks.py
    python benchmarks/blocks.py --modes default max-autotune-no-cudagraphs

For each (channels, side) of the default autoencoder it times, at batch 32 in bf16 autocast
and channels_last: the ResBlock; the same block with its GroupNorms replaced by identities
(what the convolutions and SiLU cost alone); GroupNorm + SiLU alone; and the block and the
norm with GroupNorm + SiLU in animevq.kernels' Triton kernels ("fused"), and computed from
per-channel sums (``animevq.nn.blocks.CHANNEL_SUMS``, "sums"). Beside each it
prints the convolutions' FLOPs over the measured bf16 matrix rate, the bytes that must move
at least (each activation read and written once, forward and backward) over the measured
copy bandwidth, and the bytes autograd saves for backward. The ceilings are measured in the
same call (a large bf16 matmul, a large device-to-device copy). Not a test; it needs a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from animevq.kernels.group_norm_silu import fuse_group_norm_silu  # noqa: E402
from animevq.nn.blocks import CHANNEL_SUMS, ResBlock, group_norm, set_norm_silu_kernel  # noqa: E402

SHAPES = ((128, 256), (256, 128), (256, 64), (256, 32), (256, 16))  # the default model's levels


def timed(fn, steps: int = 20, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s) measured here."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / timed(lambda: a @ b)
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src))
    return flops, bandwidth


class NoNorm(nn.Identity):
    """A ResBlock's norm slot without the norm: ``silu(x)`` is SiLU alone (the "no-GN" column)."""

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(x)


class NormAct(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm.silu(x)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes the forward pass leaves allocated for backward (saved tensors; the output not
    counted). By allocator counts, not saved-tensor hooks: Dynamo cannot trace an
    autograd.Function under those hooks."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.bfloat16):
        y = module(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    y.float().square().mean().backward()
    return held


def step_time(module: nn.Module, x: torch.Tensor) -> float:
    grad = torch.randn_like(x)

    def run() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            y = module(x)
        y.backward(grad.to(y.dtype))

    return timed(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--modes", nargs="+", default=["default"])
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    flop_rate, bandwidth = ceilings()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s, "
          f"copy {bandwidth / 1e12:.2f} TB/s, batch {args.batch}")
    print(f"{'mode':<28}{'C×side':>9}{'block ms':>10}{'no-GN ms':>10}{'GN+SiLU ms':>12}"
          f"{'fused block':>13}{'fused GN':>10}{'sums block':>12}{'sums GN':>9}{'conv floor':>12}{'byte floor':>12}"
          f"{'saved MB':>10}{'fused MB':>10}{'sums MB':>9}")
    for mode in args.modes:
        for channels, side in SHAPES:
            torch.manual_seed(0)
            x = torch.randn(args.batch, channels, side, side, device="cuda").to(
                dtype=torch.bfloat16, memory_format=torch.channels_last).requires_grad_(True)
            block = ResBlock(channels).cuda().to(memory_format=torch.channels_last)
            bare = ResBlock(channels).cuda().to(memory_format=torch.channels_last)
            bare.norm1, bare.norm2 = NoNorm(), NoNorm()
            norm = NormAct(channels).cuda()
            saved = saved_bytes(torch.compile(block, mode=mode), x)
            times = [step_time(torch.compile(m, mode=mode), x) for m in (block, bare, norm)]
            fused_block, fused_norm = copy.deepcopy(block), copy.deepcopy(norm)
            fuse_group_norm_silu(fused_block), fuse_group_norm_silu(fused_norm)
            fused_saved = saved_bytes(torch.compile(fused_block, mode=mode), x)
            times += [step_time(torch.compile(m, mode=mode), x) for m in (fused_block, fused_norm)]
            sums_block, sums_norm = copy.deepcopy(block), copy.deepcopy(norm)
            set_norm_silu_kernel(sums_block, CHANNEL_SUMS), set_norm_silu_kernel(sums_norm, CHANNEL_SUMS)
            sums_saved = saved_bytes(torch.compile(sums_block, mode=mode), x)
            times += [step_time(torch.compile(m, mode=mode), x) for m in (sums_block, sums_norm)]
            conv_flops = 3 * 2 * (2 * 9 * channels * channels * side * side * args.batch)  # fwd + 2 bwd
            activation = x.numel() * x.element_size()
            # forward: each of 5 tensors (x, GN1 out, conv1 out, GN2 out, y) written or read once;
            # backward the same again plus the saved ones read: about 4x the forward's.
            floor_bytes = 4 * 5 * activation
            print(f"{mode:<28}{f'{channels}×{side}':>9}{times[0] * 1e3:>10.2f}{times[1] * 1e3:>10.2f}"
                  f"{times[2] * 1e3:>12.2f}{times[3] * 1e3:>13.2f}{times[4] * 1e3:>10.2f}"
                  f"{times[5] * 1e3:>12.2f}{times[6] * 1e3:>9.2f}"
                  f"{conv_flops / flop_rate * 1e3:>12.2f}{floor_bytes / bandwidth * 1e3:>12.2f}"
                  f"{saved / 1e6:>10.0f}{fused_saved / 1e6:>10.0f}{sums_saved / 1e6:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
