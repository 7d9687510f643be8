"""Tokenizing with each GroupNorm + SiLU implementation, in one process.

    python benchmarks/encode_fused.py

``benchmarks/throughput.py``'s encode row (batch 256, 256×256, bf16, channels_last, the
encoder compiled) three times: Inductor's GroupNorm (the default), the fused Triton kernels
(``fused_norm``), and the per-channel-sums form (``animevq.nn.blocks.CHANNEL_SUMS``). Not a
test; it needs a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]

import throughput  # noqa: E402


def main() -> None:
    for name, fused, sums in (("Inductor's GroupNorm", False, False), ("fused_norm", True, False),
                              ("channel sums", False, True)):
        args = argparse.Namespace(channels_last=True, fused_norm=fused, channel_sums=sums, compile=True,
                                  compile_mode="default", encode_batch=256, size=256, warmup=5, steps=20)
        start = time.time()
        row = throughput.bench_encode(args)
        print(f"{name}: {row['images_per_s']:.1f} img/s ({time.time() - start:.0f} s with compile)", flush=True)


if __name__ == "__main__":
    main()
