"""VQ-EMA: a nearest-neighbour quantiser whose codebook follows an exponential moving
average of its assigned vectors (SPEC §3).

References: van den Oord et al. 2017 (VQ-VAE, eq. 3 and appendix A.1 for the EMA
update); Razavi et al. 2019 (VQ-VAE-2); Dhariwal et al. 2020 (Jukebox, dead-code
restart); Arthur & Vassilvitskii 2007 (k-means++, D² sampling for restarts and seeds);
Yu et al. 2022 (ViT-VQGAN, l2-normalised codes).

Shapes: B batch, D code dimension, h×w latent grid, N = B·h·w vectors, K codes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import VQConfig
from .base import CodebookQuantizer, QuantizerOutput, QuantizerStats, code_counts, code_stats
from .kmeans import L2_EPS, lloyd, nearest_code

__all__ = ["VectorQuantizerEMA"]

LAPLACE_EPS = 1e-5  # VQ-VAE's EMA smoothing ε; survives float32 sums of K=65,536 codes
UNIFORM_BITS = 30  # resolution of the uniform draws that pick error-weighted restart vectors
_D = VQConfig  # the one place of the defaults below


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_MIX = (0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64))  # MurmurHash3 fmix64


def _hash_draw(step: torch.Tensor, seed: int, count: int, high: int) -> torch.Tensor:
    """``count`` pseudo-random integers in [0, high) from a step counter, computed on the
    counter's device: identical on every rank and free of host synchronisation."""
    x = step.long() * count + torch.arange(count, device=step.device) + seed * 0x9E3779B97F4A7C15 % (1 << 62)
    for mult in _MIX:  # int64 products wrap; shifts mix the high bits into the low ones
        x = (x ^ (x >> 33)) * mult
    return (x ^ (x >> 33)).remainder(high)


class VectorQuantizerEMA(CodebookQuantizer):
    """Nearest-neighbour quantiser whose codebook follows an EMA of its assigned vectors.

    The arguments are :class:`~animevq.nn.config.VQConfig`'s fields (see there), with
    ``l2_normalize`` for its ``l2_normalize_codes``; :meth:`from_config` builds one from
    that config. ``eps`` is the Laplace smoothing ε of the EMA counts.
    """

    def __init__(
        self,
        num_embeddings: int = _D.num_embeddings,
        embedding_dim: int = _D.embedding_dim,
        commitment_cost: float = _D.commitment_cost,
        decay: float = _D.decay,
        eps: float = LAPLACE_EPS,
        *,
        restart_dead_codes: bool = _D.restart_dead_codes,
        dead_code_threshold: float = _D.dead_code_threshold,
        restart_sampling: str = _D.restart_sampling,
        kmeans_init: bool = _D.kmeans_init,
        kmeans_iters: int = _D.kmeans_iters,
        l2_normalize: bool = _D.l2_normalize_codes,
        seed: int = _D.seed,
    ) -> None:
        super().__init__()
        self.config = VQConfig(  # validates every setting
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, commitment_cost=commitment_cost,
            decay=decay, restart_dead_codes=restart_dead_codes, dead_code_threshold=dead_code_threshold,
            restart_sampling=restart_sampling, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            l2_normalize_codes=l2_normalize, seed=seed,
        )
        self.num_embeddings, self._embedding_dim = num_embeddings, embedding_dim
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
            self.embedding = torch.nn.Parameter(init)
        # EMA statistics (float32 buffers): N starts at 1 and m at the codes, so a code no
        # vector picks keeps its place (taming starts N at 0: unused codes blow up by 1/ε).
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", init.clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._kmeans_checked = False  # host-side: `initialized` was read once (one sync)

    @classmethod
    def from_config(cls, config: VQConfig) -> VectorQuantizerEMA:
        options = {f: getattr(config, f) for f in ("restart_dead_codes", "dead_code_threshold", "restart_sampling",
                                                     "kmeans_init", "kmeans_iters", "seed")}
        return cls(config.num_embeddings, config.embedding_dim, config.commitment_cost, config.decay,
                   l2_normalize=config.l2_normalize_codes, **options)

    @property
    def codebook(self) -> torch.Tensor:
        """The (K,D) codebook."""
        return self.embedding

    def _prepare(self, z_e: torch.Tensor) -> torch.Tensor:
        z = z_e.float().permute(0, 2, 3, 1)  # (B,h,w,D)
        return F.normalize(z, dim=-1, eps=L2_EPS) if self.l2_normalize else z

    @torch.no_grad()
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codes of (B,D,h,w) latents → (B,h,w) int64, without any update."""
        z = self._prepare(z_e)
        return nearest_code(z.reshape(-1, self.embedding_dim), self.embedding).view(z.shape[:-1])

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) encoder output; in training mode also update the codebook."""
        self.check_latents(z_e)
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
            z_q=z_q.permute(0, 3, 1, 2),  # (B,h,w,D) → (B,D,h,w)
            indices=indices.view(z.shape[:-1]),  # (N,) → (B,h,w)
            losses={"vq_loss": vq_loss, "commitment_loss": commitment_loss},
            loss=vq_loss + self.commitment_cost * commitment_loss,
            stats=QuantizerStats(counts=counts, perplexity=perplexity, code_usage_rate=usage, restarted=restarted),
        )

    def host_state(self) -> dict[str, Any]:
        return {"kmeans_checked": self._kmeans_checked}

    def load_host_state(self, state: dict[str, Any]) -> None:
        self._kmeans_checked = bool(state.get("kmeans_checked", self._kmeans_checked))

    @property
    def decides_on_host(self) -> bool:
        """True until the k-means initialisation has been checked for (its first batch)."""
        return self.kmeans_init and not self._kmeans_checked

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
