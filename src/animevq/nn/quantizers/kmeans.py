"""Nearest codes and Lloyd's k-means, in float32 whatever the autocast (SPEC §3).

Shapes: N vectors of dimension D, K codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .base import code_counts

__all__ = ["DISTANCE_CHUNK_ELEMENTS", "L2_EPS", "lloyd", "nearest_code"]

DISTANCE_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 distances per chunk, any K
L2_EPS = 1e-6  # float16-safe floor for vector norms


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Keep CUDA matmuls in true float32 (no TF32, 10-bit mantissa) while picking codes:
    close distances must rank as they would in float32 even if a run enabled TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = DISTANCE_CHUNK_ELEMENTS) -> torch.Tensor:
    """Index of the nearest code by squared L2 distance, in float32, in row chunks.

    z: (N,D), codebook: (K,D) → (N,) int64. ‖z‖² is constant per row, so the argmin
    only needs ‖e‖² − 2 z·e; chunking keeps at most ``chunk_elements`` distances alive.
    """
    with torch.autocast(device_type=z.device.type, enabled=False), _full_float32():
        z, e = z.float(), codebook.float()
        e_sq = (e * e).sum(dim=1)  # (K,)
        if torch.compiler.is_exporting():  # one graph for any batch size (ONNX): no chunks
            return torch.addmm(e_sq.unsqueeze(0), z, e.t(), beta=1.0, alpha=-2.0).argmin(dim=1)  # (N,K) → (N,)
        rows = max(1, chunk_elements // max(1, e.shape[0]))
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            chunk = z[start : start + rows]
            dist_ = torch.addmm(e_sq.unsqueeze(0), chunk, e.t(), beta=1.0, alpha=-2.0)  # (n,K)
            out[start : start + rows] = dist_.argmin(dim=1)
        return out


@torch.no_grad()
def lloyd(vectors: torch.Tensor, codes: torch.Tensor, iters: int, *, l2_normalize: bool = False) -> torch.Tensor:
    """Lloyd's k-means on (N,D) ``vectors`` from (K,D) ``codes`` → new (K,D) codes; a code
    that no vector picks stays where it is. With ``l2_normalize`` the codes stay unit vectors."""
    codes = codes.clone()
    for _ in range(iters):
        assign = nearest_code(vectors, codes)
        n = code_counts(assign, codes.shape[0])
        s = torch.zeros_like(codes).index_add_(0, assign, vectors)
        used = n > 0
        codes[used] = s[used] / n[used].unsqueeze(1)
        if l2_normalize:
            codes = F.normalize(codes, dim=1, eps=L2_EPS)
    return codes
