"""The fused GroupNorm + SiLU kernels (animevq.kernels) against PyTorch's ops, forward and
backward. On the CPU they run under Triton's interpreter in a child process (the variable must
be set before Triton is imported); ``tests/gpu`` runs them compiled on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SRC = Path(__file__).resolve().parents[2] / "src"

CHILD = r"""
import torch, torch.nn.functional as F
from animevq.kernels.group_norm_silu import group_norm_silu, supports, fuse_group_norm_silu, KERNEL
from animevq.nn.blocks import ResBlock

torch.manual_seed(0)
# (B, C, H, W, groups): partial tiles, a last program with an empty tile (17 tiles of 32 rows),
# channels that are not a power of two, large offsets of the mean (variance merging).
for B, C, H, W, G, offset in [(2, 16, 5, 7, 4, 0.0), (1, 24, 4, 4, 6, 0.0), (2, 128, 17, 32, 32, 0.0),
                              (3, 64, 9, 9, 16, 200.0)]:
    x = (torch.randn(B, C, H, W, dtype=torch.float64) * 3 + offset).float()
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(C) * 0.5 + 1).requires_grad_()
    b = torch.randn(C).requires_grad_()
    out = group_norm_silu(x, w, b, G, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == x.dtype
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.silu(F.group_norm(leaves[0], G, leaves[1], leaves[2], 1e-6))
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for name, got, want in [("out", out, ref), ("dx", x.grad, leaves[0].grad), ("dweight", w.grad, leaves[1].grad),
                            ("dbias", b.grad, leaves[2].grad)]:
        err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item()
        assert err < 2e-5, (B, C, H, W, G, offset, name, err)

# bf16 in, bf16 out, against float32 ops on the same bf16 input
x = torch.randn(2, 32, 8, 8).to(torch.bfloat16, memory_format=torch.channels_last)
out = group_norm_silu(x, torch.ones(32), torch.zeros(32), 8, 1e-6)
ref = F.silu(F.group_norm(x.float(), 8, eps=1e-6))
assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()

assert not supports(torch.randn(2, 32, 8, 8), 8)  # NCHW: PyTorch's ops
assert not supports(torch.randn(2, 30, 8, 8).to(memory_format=torch.channels_last), 8)

# A ResBlock with fused norms: same state dict, same outputs and gradients, NCHW falls back
torch.manual_seed(1)
plain, fused = ResBlock(32, 64), ResBlock(32, 64)
fused.load_state_dict(plain.state_dict())
assert fuse_group_norm_silu(fused) == 2 and fused.state_dict().keys() == plain.state_dict().keys()
assert fused.norm1.silu_kernel is KERNEL and plain.norm1.silu_kernel is None
for fmt in (torch.channels_last, torch.contiguous_format):
    x = torch.randn(2, 32, 8, 8).to(memory_format=fmt)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ya, yb = plain(xs[0]), fused(xs[1])
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert (ya - yb).abs().max().item() < 1e-5
    assert (xs[0].grad - xs[1].grad).abs().max().item() < 1e-5
    assert (plain.norm2.weight.grad - fused.norm2.weight.grad).abs().max().item() < 1e-4
    plain.zero_grad(), fused.zero_grad()
print("ok")
"""


def test_fused_group_norm_silu_matches_pytorch_forward_and_backward() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(SRC))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
