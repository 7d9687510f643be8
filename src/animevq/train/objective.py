"""The training objective (SPEC §4): it owns LPIPS, the discriminator, LeCam's averages and
VQ-GAN's adaptive weight, as LlamaGen's ``VQLoss`` does, and returns named outputs.

    total = λ_rec·L1(x, x̂) + λ_vq·vq + λ_commit·commit + λ_perc·LPIPS(x, x̂) [+ w·G]

The quantizer's losses arrive by name and unweighted; ``vq_loss`` and ``commitment_loss`` take
the seed's ``lambda_vq`` and ``lambda_commit``, any other the weight its family gives it
(``Quantizer.loss_weights``, e.g. LFQ's ``entropy_weight``).
Shapes: images (B,C,H,W) in [-1,1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdversarialOptions, LossConfig
from ..nn.discriminator import NUM_LAYERS, PatchDiscriminator
from ..nn.quantizers import QuantizerOutput
from ..nn.quantizers.base import TrainingSnapshot, restore_buffers, snapshot_buffers
from ..nn.tokenizer import TokenizerOutput
from .losses import LeCamEMA, adaptive_weight_from_grads, d_loss, generator_loss, lecam_loss, ramp_weight

__all__ = ["DiscriminatorOutput", "GeneratorOutput", "Objective", "ObjectiveOutput", "VQVAEOutput", "family_losses"]

SEED_LOSSES = ("vq_loss", "commitment_loss")  # logged under their own keys whatever the family

class ObjectiveOutput(NamedTuple):
    """The VQ-VAE losses of one reconstruction."""

    recon_loss: torch.Tensor  # L1(x, x̂), float32
    vq_loss: torch.Tensor  # the quantizer's codebook loss (0 for families without one)
    commitment_loss: torch.Tensor  # the quantizer's commitment loss (0 for families without one)
    perc_loss: torch.Tensor  # LPIPS(x, x̂); 0 without LPIPS
    total_loss: torch.Tensor  # the weighted sum above, without the GAN term


class VQVAEOutput(NamedTuple):
    """What ``VQVAEModel.forward`` returns: the reconstruction, its losses and code statistics."""

    reconstruction: torch.Tensor  # (B,C,H,W) in [-1,1]
    indices: torch.Tensor  # (B,h,w) int64
    recon_loss: torch.Tensor  # L1(x, x_rec)
    vq_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perc_loss: torch.Tensor  # LPIPS(x, x_rec), 0 without LPIPS
    total_loss: torch.Tensor  # λ_rec·L1 + λ_vq·vq + λ_commit·commit + λ_perc·LPIPS
    perplexity: torch.Tensor
    code_usage_rate: torch.Tensor
    counts: torch.Tensor  # (K,) code histogram of the batch
    restarted: torch.Tensor  # dead codes restarted by this call
    quantizer_losses: dict[str, torch.Tensor]  # every loss of the quantizer, unweighted, by name

    @classmethod
    def of(cls, tokenized: TokenizerOutput, losses: ObjectiveOutput, reconstruction: torch.Tensor) -> VQVAEOutput:
        stats = tokenized.quantized.stats
        return cls(reconstruction, tokenized.indices, losses.recon_loss, losses.vq_loss, losses.commitment_loss,
                   losses.perc_loss, losses.total_loss, stats.perplexity, stats.code_usage_rate, stats.counts,
                   stats.restarted, tokenized.quantized.losses)


def family_losses(out: VQVAEOutput, prefix: str) -> dict[str, torch.Tensor]:
    """The quantizer's losses beyond the seed's two (LFQ's ``entropy_loss``...) as logging keys."""
    return {prefix + name: value for name, value in out.quantizer_losses.items() if name not in SEED_LOSSES}


class GeneratorOutput(NamedTuple):
    """VQ-GAN's generator losses, arranged for a single backward pass."""

    losses: ObjectiveOutput  # of the reconstruction (its gradient cut: see Objective.generator)
    g_loss: torch.Tensor  # the adversarial loss G, detached
    d_weight: torch.Tensor  # its weight: adaptive weight × λ_gan × ramp, detached
    surrogate: torch.Tensor  # a loss whose gradient is that of total_loss + d_weight·G


class DiscriminatorOutput(NamedTuple):
    """The discriminator's loss on real images and detached reconstructions."""

    loss: torch.Tensor  # what its optimiser minimises: d_loss (+ the LeCam term)
    d_loss: torch.Tensor  # hinge or non-saturating loss, detached
    logits_real: torch.Tensor  # mean logit on real images, detached
    logits_fake: torch.Tensor  # mean logit on reconstructions, detached


class Objective(nn.Module):
    """Losses of a reconstruction, and VQ-GAN's two players' losses when ``lambda_gan > 0``.

    Args:
        losses: the loss weights and LPIPS's weights.
        adversarial: the discriminator's settings (used when ``losses.lambda_gan > 0``).
        in_channels: image channels, for the discriminator.
        quantizer_weights: the quantizer family's weights of its other losses (``Quantizer.loss_weights``).
    """

    def __init__(self, losses: LossConfig, adversarial: AdversarialOptions, in_channels: int,
                 quantizer_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.config, self.adversarial = losses, adversarial
        self.lpips: nn.Module | None = None
        if losses.use_lpips:
            from ..nn.lpips import LPIPS, VGGWeightsMissing  # torchvision's VGG: only when asked for

            try:
                self.lpips = LPIPS(vgg_weights=losses.lpips_vgg_weights, random_init=losses.lpips_random_init)
            except VGGWeightsMissing as error:  # the settings that fix it, as the CLI and YAML spell them
                raise VGGWeightsMissing(error.reason, advice=(
                    f"Download {error.url} (on a machine with internet) and pass --model.losses.lpips_vgg_weights "
                    f"/path/to/vgg16-397923af.pth (or put the file at {error.cache}), or train without the "
                    "perceptual loss: --model.use_lpips false")) from error
        self.discriminator: PatchDiscriminator | None = None
        self.lecam: LeCamEMA | None = None
        if losses.lambda_gan > 0:
            self.discriminator = PatchDiscriminator(in_channels, adversarial.disc_channels, NUM_LAYERS,
                                                    norm=adversarial.disc_norm)
            self.lecam = LeCamEMA() if adversarial.lecam_weight > 0 else None
        self.quantizer_weights = {**(quantizer_weights or {}), "vq_loss": losses.lambda_vq,
                                  "commitment_loss": losses.lambda_commit}

    def _quantizer_terms(self, q: QuantizerOutput) -> torch.Tensor | None:
        """Σ weight·loss over the quantizer's losses, in their order."""
        total = None
        for name, value in q.losses.items():
            term = self.quantizer_weights.get(name, 1.0) * value
            total = term if total is None else total + term
        return total

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor, q: QuantizerOutput) -> ObjectiveOutput:
        """Every named loss of a reconstruction ``x_rec`` of ``x`` and its quantizer output ``q``."""
        cfg = self.config
        recon_loss = F.l1_loss(x_rec.float(), x.float())
        perc_loss = self.lpips(x, x_rec, reduction="mean") if self.lpips is not None else recon_loss.new_zeros(())
        total = cfg.lambda_rec * recon_loss
        for name, value in q.losses.items():  # added one by one, in order: float sums are not associative
            total = total + self.quantizer_weights.get(name, 1.0) * value
        total = total + cfg.lambda_perc * perc_loss
        zero = recon_loss.new_zeros(())
        return ObjectiveOutput(recon_loss, q.losses.get("vq_loss", zero), q.losses.get("commitment_loss", zero),
                               perc_loss, total)

    def generator(self, x: torch.Tensor, x_rec: torch.Tensor, q: QuantizerOutput, *, batch: int,
                  last_layer: torch.Tensor, loss_scale: float = 1.0) -> GeneratorOutput:
        """The generator's losses with the adaptive weight, backpropagating through the heavy parts once.

        The image losses (L1, LPIPS) and the GAN loss are taken on a detached copy of the
        reconstruction, so their gradients with respect to it come from one pass through VGG
        and one through the discriminator. ∇_W of each (W = ``last_layer``, the decoder's last
        conv) then costs only that conv's weight gradient, and the autoencoder's backward runs
        once, driven by ``surrogate``, whose gradient is exactly that of
        λ_rec·L1 + λ_perc·LPIPS + λ_vq·vq + λ_commit·commit + w·G.
        ``loss_scale`` (float16's loss scale) keeps the unscaled gradients from underflowing.
        """
        cfg, adv = self.config, self.adversarial
        x_leaf = x_rec.detach().requires_grad_(True)
        losses = self(x, x_leaf, q)
        image_nll = cfg.lambda_rec * losses.recon_loss + cfg.lambda_perc * losses.perc_loss
        g_loss = generator_loss(self.discriminator(x_leaf), adv.disc_loss)
        grad_nll = torch.autograd.grad(image_nll * loss_scale, x_leaf)[0]
        grad_g = torch.autograd.grad(g_loss * loss_scale, x_leaf)[0]
        ramp = ramp_weight(batch, adv.disc_start, adv.disc_ramp_steps)
        if adv.adaptive_disc_weight:
            w_nll = torch.autograd.grad(x_rec, last_layer, grad_nll, retain_graph=True)[0]
            w_g = torch.autograd.grad(x_rec, last_layer, grad_g, retain_graph=True)[0]
            weight = adaptive_weight_from_grads(w_nll / loss_scale, w_g / loss_scale, max_weight=adv.disc_weight_max)
        else:
            weight = torch.ones((), device=x.device)
        d_weight = weight * (cfg.lambda_gan * ramp)
        grad = (grad_nll.float() + d_weight * grad_g.float()) / loss_scale
        surrogate = (x_rec.float() * grad.detach()).sum()
        quantizer_terms = self._quantizer_terms(q)
        if quantizer_terms is not None:
            surrogate = surrogate + quantizer_terms
        return GeneratorOutput(losses, g_loss.detach(), d_weight, surrogate)

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> DiscriminatorOutput:
        """The discriminator's loss on real ``x`` and the (detached) reconstruction; updates
        LeCam's averages first, as the authors' code does."""
        adv = self.adversarial
        real = self.discriminator(x.detach())
        fake = self.discriminator(x_rec.detach())
        value = d_loss(real, fake, adv.disc_loss)
        loss = value
        if self.lecam is not None:
            self.lecam.update(real, fake)
            loss = loss + adv.lecam_weight * lecam_loss(real, fake, self.lecam.ema_real, self.lecam.ema_fake)
        return DiscriminatorOutput(loss, value.detach(), real.detach().float().mean(), fake.detach().float().mean())

    # What a skipped (non-finite) batch must put back: the discriminator's BatchNorm
    # statistics (it sees the reconstruction before the loss is known) and LeCam's averages.
    def _stateful(self) -> list[nn.Module]:
        return [m for m in (self.discriminator, self.lecam) if m is not None]

    def training_snapshot(self) -> list[TrainingSnapshot]:
        return [snapshot_buffers(m) for m in self._stateful()]

    def restore_training_snapshot(self, snapshot: list[TrainingSnapshot], skip: torch.Tensor | None = None) -> None:
        for module, saved in zip(self._stateful(), snapshot):
            restore_buffers(module, saved, skip)
