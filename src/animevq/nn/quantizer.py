"""Vector quantiser with an exponential-moving-average codebook (SPEC §3).

References: van den Oord et al. 2017 (VQ-VAE, eq. 3 and appendix A.1 for the EMA
update); Razavi et al. 2019 (VQ-VAE-2); Dhariwal et al. 2020 (Jukebox, dead-code
restart); Arthur & Vassilvitskii 2007 (k-means++, D² sampling for restarts and seeds);
Yu et al. 2022 (ViT-VQGAN, l2-normalised codes).

Shapes: B batch, D code dimension, h×w latent grid, N = B·h·w vectors, K codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizerOutput", "VectorQuantizerEMA", "nearest_code", "code_counts", "code_stats", "lloyd"]

DISTANCE_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 distances per chunk, any K
LAPLACE_EPS = 1e-5  # VQ-VAE's EMA smoothing ε; survives float32 sums of K=65,536 codes
L2_EPS = 1e-6  # float16-safe floor for vector norms
RESTART_SAMPLING = ("error", "uniform")
UNIFORM_BITS = 30  # resolution of the uniform draws that pick error-weighted restart vectors


class QuantizerOutput(NamedTuple):
    """What one quantiser call returns."""

    z_q: torch.Tensor  # (B,D,h,w) quantised vectors, straight-through to z_e
    indices: torch.Tensor  # (B,h,w) int64 code indices in [0,K)
    loss: torch.Tensor  # vq_loss + commitment_cost·commitment_loss (standalone use)
    vq_loss: torch.Tensor  # mse(z_q, sg[z_e]); trains the codebook only when decay = 0
    commitment_loss: torch.Tensor  # mse(z_e, sg[z_q]); pulls the encoder to its codes
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    code_usage_rate: torch.Tensor  # fraction of the K codes used by this batch
    counts: torch.Tensor  # (K,) float32 histogram of this batch's codes
    restarted: torch.Tensor  # number of dead codes restarted by this call (int64)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
        rows = max(1, chunk_elements // max(1, e.shape[0]))
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            chunk = z[start : start + rows]
            dist_ = torch.addmm(e_sq.unsqueeze(0), chunk, e.t(), beta=1.0, alpha=-2.0)  # (n,K)
            out[start : start + rows] = dist_.argmin(dim=1)
        return out


def code_counts(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """(K,) float32 histogram of code indices. Unlike ``torch.bincount``, which reads the
    largest index back to the host on CUDA, this never waits for the GPU; float32 holds
    every count exactly up to 2**24 vectors per batch."""
    flat = indices.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(num_embeddings, dtype=torch.float32, device=flat.device).scatter_add_(0, flat, ones)


def code_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity exp(H(p)) and the used fraction of a (K,) code histogram."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


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


_MIX = (0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64))  # MurmurHash3 fmix64


def _hash_draw(step: torch.Tensor, seed: int, count: int, high: int) -> torch.Tensor:
    """``count`` pseudo-random integers in [0, high) from a step counter, computed on the
    counter's device: identical on every rank and free of host synchronisation."""
    x = step.long() * count + torch.arange(count, device=step.device) + seed * 0x9E3779B97F4A7C15 % (1 << 62)
    for mult in _MIX:  # int64 products wrap; shifts mix the high bits into the low ones
        x = (x ^ (x >> 33)) * mult
    return (x ^ (x >> 33)).remainder(high)


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantiser whose codebook follows an EMA of its assigned vectors.

    Args:
        num_embeddings: K, the codebook size.
        embedding_dim: D, the dimension of each code.
        commitment_cost: β weighting the commitment term in ``loss`` when the quantiser is
            used on its own (the VQ-VAE model weights the two terms itself).
        decay: EMA decay γ; 0 trains the codebook by gradient through ``vq_loss`` instead.
        eps: Laplace smoothing ε of the EMA counts.
        restart_dead_codes: replace codes whose EMA count falls below
            ``dead_code_threshold`` × the mean count by encoder vectors drawn from the
            current (global) batch; keeps usage near 100 % (Jukebox, Dhariwal et al. 2020).
        dead_code_threshold: fraction of the mean EMA count under which a code is dead.
        restart_sampling: how restart vectors are drawn from the global batch: ``"error"``
            with probability ∝ their squared distance to their code (k-means++'s rule:
            new codes go where the codebook fits worst, not onto plain page that is
            already well coded), or ``"uniform"``.
        kmeans_init: initialise the codebook by k-means on the first training batch
            (global under DDP); helps large K converge fast.
        l2_normalize: compare unit vectors (cosine similarity, ViT-VQGAN); steadier usage
            for large K, at the cost of discarding vector norms.
        seed: base seed of the restart sampler, identical on every rank.
    """

    def __init__(
        self,
        num_embeddings: int = 1024,
        embedding_dim: int = 256,
        commitment_cost: float = 0.25,  # VQ-VAE paper's β
        decay: float = 0.99,  # VQ-VAE paper; smaller values let codes jitter between batches
        eps: float = LAPLACE_EPS,
        *,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 0.125,  # a code used 8× less than average is dead
        restart_sampling: str = "error",
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, {embedding_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if restart_sampling not in RESTART_SAMPLING:
            raise ValueError(f"restart_sampling must be one of {RESTART_SAMPLING}, got {restart_sampling!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.decay, self.eps = commitment_cost, decay, eps
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        self.restart_sampling = restart_sampling
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.l2_normalize, self.seed = l2_normalize, seed

        init = torch.empty(num_embeddings, embedding_dim).uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)
        if l2_normalize:
            init = F.normalize(torch.randn(num_embeddings, embedding_dim), dim=1, eps=L2_EPS)
        if decay > 0:
            self.register_buffer("embedding", init)
        else:
            self.embedding = nn.Parameter(init)
        # EMA statistics (float32 buffers): N starts at 1 and m at the codes, so a code no
        # vector picks keeps its place (taming starts N at 0: unused codes blow up by 1/ε).
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", init.clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._kmeans_checked = False

    @property
    def codebook(self) -> torch.Tensor:
        """The (K,D) codebook."""
        return self.embedding

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices: (B,h,w) → (B,D,h,w)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be integer, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise ValueError(f"indices must lie in [0, {self.num_embeddings}), got [{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.embedding).permute(0, 3, 1, 2)  # (B,h,w,D) → (B,D,h,w)

    def _prepare(self, z_e: torch.Tensor) -> torch.Tensor:
        z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D)
        return F.normalize(z, dim=-1, eps=L2_EPS) if self.l2_normalize else z

    @torch.no_grad()
    def quantize_indices(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codes of (B,D,h,w) latents → (B,h,w) int64, without any update."""
        z = self._prepare(z_e)
        return nearest_code(z.reshape(-1, self.embedding_dim), self.embedding).view(z.shape[:-1])

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) encoder output; in training mode also update the codebook."""
        if z_e.dim() != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"expected (B,{self.embedding_dim},h,w) latents, got {tuple(z_e.shape)}")
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = self._prepare(z_e)  # (B,h,w,D) float32
            flat = z.reshape(-1, self.embedding_dim)  # (N,D)
            ema = self.training and self.decay > 0
            if ema and self.kmeans_init and not self._kmeans_checked:
                if not bool(self.initialized):  # one host sync, on the first batch only
                    self._kmeans_init(flat.detach())
                self._kmeans_checked = True
            indices = nearest_code(flat.detach(), self.embedding)  # (N,)
            counts = code_counts(indices, self.num_embeddings)  # (K,)
            z_q = F.embedding(indices, self.embedding).view_as(z)  # (B,h,w,D), pre-update codes
            restarted = torch.zeros((), dtype=torch.long, device=z.device)
            if ema:
                restarted = self._ema_update(flat.detach(), indices, counts, z_q.detach().view_as(flat))
            vq_loss = F.mse_loss(z_q, z.detach())
            commitment_loss = F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through estimator (VQ-VAE §3.2)
            perplexity, usage = code_stats(counts)
        return QuantizerOutput(
            z_q=z_q.permute(0, 3, 1, 2),  # (B,D,h,w)
            indices=indices.view(z.shape[:-1]),
            loss=vq_loss + self.commitment_cost * commitment_loss,
            vq_loss=vq_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            code_usage_rate=usage,
            counts=counts,
            restarted=restarted,
        )

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                    codes_before: torch.Tensor) -> torch.Tensor:
        """VQ-VAE appendix A.1 with Laplace smoothing; statistics summed over ranks first.

        Under DDP one all-reduce carries the counts, the vector sums and each rank's total
        quantisation error (for error-weighted restarts); a restart adds one more.
        """
        world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        n = counts  # (K,)
        s = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K,D)
        rank_error = torch.zeros(world, device=flat.device)  # each rank's total error
        error = None  # (N,) squared distance of each vector to its code, for error-weighted restarts
        if self.restart_dead_codes and self.restart_sampling == "error":
            error = (flat - codes_before).pow(2).sum(1)
            rank_error[rank] = error.sum()
        if world > 1:
            k, d = s.shape
            packed = torch.cat([s.flatten(), n, rank_error])
            dist.all_reduce(packed)
            s, n, rank_error = packed[: k * d].view(k, d), packed[k * d : k * (d + 1)], packed[k * (d + 1) :]
        g = self.decay
        self.cluster_size.mul_(g).add_(n, alpha=1 - g)  # N_i ← γN_i + (1−γ)n_i
        self.embed_sum.mul_(g).add_(s, alpha=1 - g)  # m_i ← γm_i + (1−γ)s_i
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
        codes = self.embed_sum / smoothed.unsqueeze(1)
        if self.l2_normalize:
            codes = F.normalize(codes, dim=1, eps=L2_EPS)
        self.embedding.copy_(codes)
        self.updates.add_(1)
        restarted = torch.zeros((), dtype=torch.long, device=flat.device)
        if self.restart_dead_codes:
            restarted = self._restart(flat, self._draw_rows(flat.shape[0], error, rank_error))
        return restarted

    def _global_vectors(self, flat: torch.Tensor) -> torch.Tensor:
        """All ranks' (N,D) vectors concatenated in rank order (every rank's batch has one shape)."""
        if not _distributed():
            return flat
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat.contiguous())
        return torch.cat(parts)

    def _generator(self) -> torch.Generator:
        # Seeded by the update count, which every rank shares: identical draws everywhere.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.updates))

    def _draw_rows(self, n: int, error: torch.Tensor | None,
                   rank_error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K rows of the global batch, as (owner rank, row on that rank), the same on every
        rank and free of host syncs.

        Uniform rows hash the update counter. Error-weighted rows (``error`` given: this
        rank's (N,) squared distances; ``rank_error``: every rank's total) invert the
        cumulative error at hashed uniform points: the totals pick the owning rank, and
        only the owner can resolve the row, from its own cumulative error. When every vector
        sits on its code the draw falls back to uniform rows.
        """
        count, world = self.num_embeddings, rank_error.numel()
        uniform = _hash_draw(self.updates, self.seed, count, world * n)
        owner, row = uniform // n, uniform % n
        if error is None:
            return owner, row
        scale = 1 << UNIFORM_BITS
        u = (_hash_draw(self.updates, self.seed + 1, count, scale).double() + 0.5) / scale  # (count,) in (0,1)
        rank_cdf = rank_error.double().cumsum(0)  # (world,)
        target = u * rank_cdf[-1]
        by_error = torch.searchsorted(rank_cdf, target, right=True).clamp_max(world - 1)
        start = rank_cdf[by_error] - rank_error[by_error].double()  # where the owner's share begins
        cdf = error.double().cumsum(0)  # (N,) this rank's; other ranks' rows come by all-reduce
        row_by_error = torch.searchsorted(cdf, target - start, right=True).clamp_max(n - 1)
        weighted = rank_cdf[-1] > 0
        return torch.where(weighted, by_error, owner), torch.where(weighted, row_by_error, row)

    def _pick_global(self, flat: torch.Tensor, owner: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Vectors ``row`` of ranks ``owner``, the same on every rank: (count,D).

        Each rank fills the rows it owns and an all-reduce sums them, which moves K×D
        values instead of gathering every rank's N×D batch.
        """
        if not _distributed():
            return flat[row]
        rows = torch.where((owner == dist.get_rank()).unsqueeze(1), flat[row], torch.zeros((), device=flat.device))
        dist.all_reduce(rows)
        return rows

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor, draws: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Replace dead codes by the drawn vectors of the global batch, without a host sync."""
        mean = self.cluster_size.mean()
        dead = self.cluster_size < self.dead_code_threshold * mean  # (K,), identical on all ranks
        new = self._pick_global(flat, *draws)  # (K,D) candidates
        if self.l2_normalize:
            new = F.normalize(new, dim=1, eps=L2_EPS)
        column = dead.unsqueeze(1)
        self.embedding.copy_(torch.where(column, new, self.embedding))
        # A restarted code starts with an average count, so it gets a fair time to attract vectors.
        self.cluster_size.copy_(torch.where(dead, mean, self.cluster_size))
        self.embed_sum.copy_(torch.where(column, new * mean, self.embed_sum))
        return dead.sum()

    @torch.no_grad()
    def _kmeans_pp_seeds(self, pool: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii 2007): each next seed is drawn with
        probability ∝ its squared distance to the nearest seed so far. (K,D), same on every rank."""
        g = self._generator()
        first = int(torch.randint(pool.shape[0], (1,), generator=g))
        codes = torch.empty(self.num_embeddings, pool.shape[1], device=pool.device, dtype=pool.dtype)
        codes[0] = pool[first]
        nearest = ((pool - codes[0]) ** 2).sum(1)  # (N,)
        for k in range(1, self.num_embeddings):
            weights = nearest.double().cpu()
            pick = int(torch.multinomial(weights, 1, generator=g)) if weights.sum() > 0 else k % pool.shape[0]
            codes[k] = pool[pick]
            nearest = torch.minimum(nearest, ((pool - codes[k]) ** 2).sum(1))
        return codes

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means on the first (global) batch, from k-means++ seeds."""
        pool = self._global_vectors(flat)
        codes = lloyd(pool, self._kmeans_pp_seeds(pool), self.kmeans_iters, l2_normalize=self.l2_normalize)
        self.embedding.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(codes)
        self.initialized.fill_(True)
