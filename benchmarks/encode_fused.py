"""Tokenizing with and without the fused GroupNorm + SiLU kernels, in one process.

    python benchmarks/encode_fused.py

``benchmarks/throughput.py``'s encode row (batch 256, 256×256, bf16, channels_last, the
encoder compiled) twice: ``fused_norm`` off, then on. Not a test; it needs a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]

import throughput  # noqa: E402


def main() -> None:
    for fused in (False, True):
        args = argparse.Namespace(channels_last=True, fused_norm=fused, compile=True, compile_mode="default",
                                  encode_batch=256, size=256, warmup=5, steps=20)
        start = time.time()
        row = throughput.bench_encode(args)
        print(f"fused_norm={fused}: {row['images_per_s']:.1f} img/s ({time.time() - start:.0f} s with compile)",
              flush=True)


if __name__ == "__main__":
    main()
