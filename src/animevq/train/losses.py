"""Adversarial losses for VQ-GAN training, as pure functions on logits.

Every function upcasts its inputs to float32, so the losses are the same under
``16-mixed`` / ``bf16-mixed`` autocast as in full precision. Logits can have any shape
(a PatchGAN gives (B,1,h',w')); means run over all elements.

Sources: hinge loss — Lim & Ye 2017 ("Geometric GAN"), Miyato et al. 2018; non-saturating
loss — Goodfellow et al. 2014, §3; adaptive weight — Esser et al. 2021 ("Taming
Transformers", eq. 7); LeCam regularisation — Tseng et al. 2021 ("Regularizing Generative
Adversarial Networks under Limited Data", eq. 3).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdversarialOptions as _A  # the one place of the defaults below
from ..config import DiscLoss as GanLossKind

__all__ = [
    "GanLossKind",
    "GAN_LOSS_KINDS",
    "hinge_d_loss",
    "nonsaturating_d_loss",
    "d_loss",
    "generator_loss",
    "adaptive_weight",
    "adaptive_weight_from_grads",
    "LeCamEMA",
    "lecam_loss",
    "ramp_weight",
]

GAN_LOSS_KINDS: tuple[str, ...] = get_args(GanLossKind)


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; valid kinds are {GAN_LOSS_KINDS}")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; taming's ``hinge_d_loss``).

    ``0.5 · (mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))``; a scalar float32 tensor.
    """
    real_term = F.relu(1.0 - logits_real.float()).mean()
    fake_term = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (real_term + fake_term)


def nonsaturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator cross-entropy loss on logits (Goodfellow et al. 2014, eq. 1).

    ``0.5 · (mean(softplus(−D(x))) + mean(softplus(D(x̂))))``, i.e. the mean of
    −log σ(D(x)) and −log(1 − σ(D(x̂))), computed stably through softplus.
    """
    real_term = F.softplus(-logits_real.float()).mean()
    fake_term = F.softplus(logits_fake.float()).mean()
    return 0.5 * (real_term + fake_term)


def d_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLossKind = "hinge") -> Tensor:
    """Discriminator loss of the given ``kind`` (``"hinge"`` or ``"nonsaturating"``)."""
    _check_kind(kind)
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    return nonsaturating_d_loss(logits_real, logits_fake)


def generator_loss(logits_fake: Tensor, kind: GanLossKind = "hinge") -> Tensor:
    """Generator (decoder) adversarial loss on the discriminator's logits for x̂.

    ``"hinge"``: ``−mean(D(x̂))`` (Lim & Ye 2017; what taming uses with the hinge D loss).
    ``"nonsaturating"``: ``mean(softplus(−D(x̂))) = mean(−log σ(D(x̂)))`` (Goodfellow et al.
    2014, §3: strong gradients early, when D rejects x̂ easily).
    """
    _check_kind(kind)
    logits_fake = logits_fake.float()
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_weight(
    nll_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    *,
    max_weight: float = _A.disc_weight_max,  # taming's clamp
    eps: float = 1e-4,  # taming's eps; far above float16's smallest normal (6e-5)
) -> Tensor:
    """Balance of the GAN loss against the reconstruction loss (Esser et al. 2021, eq. 7).

    ``λ = ‖∇_W L_nll‖ / (‖∇_W L_G‖ + eps)`` with W = ``last_layer`` (the decoder's last conv
    weight), clamped to ``[0, max_weight]``. The gradients come from
    ``torch.autograd.grad(..., retain_graph=True)``: nothing is written to ``.grad`` and the
    graph stays usable for the generator's backward pass. Norms are taken in float32.

    Returns a detached float32 scalar; 0 when either gradient norm is not finite.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return adaptive_weight_from_grads(nll_grad, g_grad, max_weight=max_weight, eps=eps)


def adaptive_weight_from_grads(
    nll_grad: Tensor,
    g_grad: Tensor,
    *,
    max_weight: float = _A.disc_weight_max,
    eps: float = 1e-4,
) -> Tensor:
    """:func:`adaptive_weight` from the two gradients ∇_W L_nll and ∇_W L_G, already computed."""
    weight = torch.linalg.vector_norm(nll_grad.float()) / (
        torch.linalg.vector_norm(g_grad.float()) + eps
    )
    # Under 16-mixed a backward pass may overflow to inf/NaN (the GradScaler only skips the
    # step that follows it). Clamping would turn inf into max_weight, and NaN would poison
    # the generator loss, so such a step gets no GAN loss at all.
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    return weight.clamp(0.0, max_weight).detach()


class LeCamEMA(nn.Module):
    """Moving averages of the discriminator's mean logits for LeCam regularisation.

    Tseng et al. 2021, §3.1: α_R and α_F track E[D(x)] and E[D(x̂)]. Buffers (float32
    scalars, saved in checkpoints): ``ema_real``, ``ema_fake``, both starting at 0.

    Under torch.distributed the batch means are averaged over ranks before the update, so
    every rank holds the same values; every rank must then call :meth:`update` together.
    Pass ``sync_distributed=False`` to keep per-rank averages.
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(
        self,
        decay: float = 0.999,  # slow averages (common in tokenizer trainers) steady the anchors
        *,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCamEMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.sync_distributed = sync_distributed
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """``ema ← decay·ema + (1 − decay)·mean(logits)`` for the real and fake logits."""
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if self.sync_distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)  # sum over ranks, then divide: the global mean
            means /= dist.get_world_size()
        means = means.to(self.ema_real.device)
        self.ema_real.lerp_(means[0], 1.0 - self.decay)
        self.ema_fake.lerp_(means[1], 1.0 - self.decay)


def lecam_loss(
    logits_real: Tensor,
    logits_fake: Tensor,
    ema_real: Tensor | float,
    ema_fake: Tensor | float,
) -> Tensor:
    """LeCam regulariser for the discriminator (Tseng et al. 2021, eq. 3).

    ``mean(relu(D(x) − α_F)²) + mean(relu(α_R − D(x̂))²)`` with α_R = ``ema_real`` and
    α_F = ``ema_fake`` (from :class:`LeCamEMA`, updated on this batch first, as in the
    authors' code). It keeps real logits from drifting above the fake anchor and fake
    logits from falling below the real one, which bounds D under limited data. The
    anchors carry no gradient. Added to the D loss with a small weight (e.g. 0.001).
    """
    ema_real = torch.as_tensor(ema_real, dtype=torch.float32, device=logits_real.device).detach()
    ema_fake = torch.as_tensor(ema_fake, dtype=torch.float32, device=logits_real.device).detach()
    real_term = F.relu(logits_real.float() - ema_fake).pow(2).mean()
    fake_term = F.relu(ema_real - logits_fake.float()).pow(2).mean()
    return real_term + fake_term


def ramp_weight(batch_idx: int, start: int, ramp_steps: int) -> float:
    """Weight that switches a loss on at ``start`` and ramps it linearly to 1.

    0 for ``batch_idx < start``; ``(batch_idx − start + 1) / ramp_steps`` afterwards, capped
    at 1, so the weight is non-zero from ``start`` on and reaches 1 after ``ramp_steps``
    batches. ``ramp_steps=0`` switches straight to 1 at ``start`` (taming's ``disc_start``).
    ``batch_idx`` counts training batches, not Lightning's ``global_step`` (which counts
    both optimizers' steps in a GAN).
    """
    if start < 0 or ramp_steps < 0:
        raise ValueError(
            f"start and ramp_steps must be >= 0, got start={start}, ramp_steps={ramp_steps}"
        )
    if batch_idx < start:
        return 0.0
    if ramp_steps == 0:
        return 1.0
    return min(1.0, (batch_idx - start + 1) / ramp_steps)
