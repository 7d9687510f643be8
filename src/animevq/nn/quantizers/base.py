"""What every quantizer family offers the tokenizer and the trainer.

A quantizer maps latents (B,D,h,w) to quantised latents of the same shape and to code indices
(B,h,w) int64 in [0, ``codebook_size``). Its output names its auxiliary losses (unweighted:
the training objective weights them) and its per-batch statistics, which are identical on every
rank under DDP. A new family subclasses :class:`Quantizer`; the tokenizer never looks further.

Shapes: B batch, D code dimension, h×w latent grid, K = ``codebook_size``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CodebookQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "QuantizerStats",
    "TrainingSnapshot",
    "code_counts",
    "code_stats",
    "restore_buffers",
    "snapshot_buffers",
]


class QuantizerStats(NamedTuple):
    """Per-batch statistics of the codes a quantizer chose."""

    counts: torch.Tensor  # (K,) float32 histogram of this batch's codes
    perplexity: torch.Tensor  # exp(entropy) of that histogram
    code_usage_rate: torch.Tensor  # fraction of the K codes used
    restarted: torch.Tensor  # codes re-initialised by this call (int64; 0 for families without restarts)


class QuantizerOutput(NamedTuple):
    """What one quantizer call returns."""

    z_q: torch.Tensor  # (B,D,h,w) quantised latents, with the family's gradient to z_e
    indices: torch.Tensor  # (B,h,w) int64 code indices in [0,K)
    losses: dict[str, torch.Tensor]  # auxiliary losses by name, unweighted (e.g. vq_loss, commitment_loss)
    loss: torch.Tensor  # the family's own training loss when the quantizer is used on its own
    stats: QuantizerStats


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(K,) float32 histogram of code indices. Unlike ``torch.bincount``, which reads the
    largest index back to the host on CUDA, this never waits for the GPU; float32 holds
    every count exactly up to 2**24 vectors per batch."""
    flat = indices.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(num_codes, dtype=torch.float32, device=flat.device).scatter_add_(0, flat, ones)


def code_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity exp(H(p)) and the used fraction of a (K,) code histogram."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class TrainingSnapshot(NamedTuple):
    """A module's state as a training batch found it (see :meth:`Quantizer.training_snapshot`)."""

    buffers: list[torch.Tensor]  # clones, in ``module.buffers()`` order
    host: dict[str, Any]  # host-side state the batch may change


def snapshot_buffers(module: nn.Module) -> TrainingSnapshot:
    """Clones of every buffer of ``module``: what a training batch of a plain module changes."""
    return TrainingSnapshot([b.detach().clone() for b in module.buffers()], {})


def restore_buffers(module: nn.Module, snapshot: TrainingSnapshot, skip: torch.Tensor | None = None) -> None:
    """Put :func:`snapshot_buffers` back: wholly (``skip`` None) or, without a host sync,
    where the 0-d bool tensor ``skip`` is true."""
    for buffer, saved in zip(module.buffers(), snapshot.buffers):
        buffer.copy_(saved if skip is None else torch.where(skip, saved, buffer))


class Quantizer(nn.Module, abc.ABC):
    """The interface of a quantizer family."""

    @classmethod
    def from_config(cls, config: Any) -> Quantizer:
        """The family's module, built from its config dataclass, whose fields are the
        constructor's arguments unless a family says otherwise."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """K: indices lie in [0, K)."""

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """D, the channels of the latents it quantises."""

    @abc.abstractmethod
    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise (B,D,h,w) latents; in training mode a family may also update its state."""

    @abc.abstractmethod
    def encode(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) latents → (B,h,w) int64 indices, never changing any state."""

    @abc.abstractmethod
    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,h,w) integer indices in [0, K) → (B,D,h,w) quantised latents."""

    @property
    def loss_weights(self) -> dict[str, float]:
        """The family's own weights of its losses in the training objective, by name. The
        objective weights ``vq_loss`` and ``commitment_loss`` by the seed's ``lambda_vq`` and
        ``lambda_commit``; a loss named neither takes its weight from here (1 if absent)."""
        return {}

    def check_latents(self, z_e: torch.Tensor) -> None:
        """Refuse anything but (B,D,h,w) latents of this quantizer's D."""
        if z_e.dim() != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"expected (B,{self.embedding_dim},h,w) latents, got {tuple(z_e.shape)}")

    def check_indices(self, indices: torch.Tensor) -> None:
        """Refuse non-integer indices, and, outside an export, indices outside [0, K)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be integer, got {indices.dtype}")
        # An exported graph cannot read values back: there ONNX's Gather checks the range (it
        # refuses indices ≥ K, and takes negative ones from the end, as numpy does).
        k = self.codebook_size
        if not torch.compiler.is_exporting() and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"indices must lie in [0, {k}), got [{int(indices.min())}, {int(indices.max())}]")

    # Training hooks: what a skipped (non-finite) batch must put back.
    def training_snapshot(self) -> TrainingSnapshot:
        """The state a training forward changes, as of now: every buffer, plus any host-side
        state (:meth:`host_state`)."""
        return snapshot_buffers(self)._replace(host=self.host_state())

    def restore_training_snapshot(self, snapshot: TrainingSnapshot, skip: torch.Tensor | None = None) -> None:
        """Put a snapshot back: wholly (``skip`` None) or, on the device without a host sync,
        where the 0-d bool ``skip`` is true (host-side state then stays)."""
        restore_buffers(self, snapshot, skip)
        if skip is None:
            self.load_host_state(snapshot.host)

    def host_state(self) -> dict[str, Any]:
        """Host-side state a training forward may change (none by default)."""
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        """Undo :meth:`host_state`."""

    @property
    def decides_on_host(self) -> bool:
        """Whether the next training forward makes a decision on the host (e.g. a one-off
        initialisation) that a skip decided on the device could not undo."""
        return False


class CodebookQuantizer(Quantizer):
    """A family whose codes are the K rows of a (K,D) table (VQ-EMA, SimVQ, IBQ): its
    constructor sets ``num_embeddings`` (K) and ``_embedding_dim`` (D)."""

    num_embeddings: int
    _embedding_dim: int

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The (K,D) codes."""

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices: (B,h,w) → (B,D,h,w)."""
        self.check_indices(indices)
        return F.embedding(indices.long(), self.codebook).permute(0, 3, 1, 2)  # (B,h,w,D) → (B,D,h,w)
