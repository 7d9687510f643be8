"""The adversarial half of ``VQVAEModel`` (VQ-GAN, Esser et al. 2021), under manual optimisation.

Each batch: one autoencoder forward; generator backward → step; then the discriminator
on the *detached* reconstruction of that same forward → step. Lightning's ``global_step``
counts both optimizers' steps, so the start, ramp, logging and accumulation use our own
batch counter (``batches_seen``), which is saved in checkpoints. The discriminator's
learning-rate schedule (warm-up included) starts when the discriminator does.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses import LeCamEMA, adaptive_weight_from_grads, d_loss, generator_loss, lecam_loss, ramp_weight
from .nn.discriminator import PatchDiscriminator

__all__ = ["AdversarialMixin"]

DISC_BASE_CHANNELS = 64  # taming / pix2pix
DISC_LAYERS = 3


class AdversarialMixin:
    """Discriminator, its optimiser and the two-step training loop. Mixed into VQVAEModel."""

    hparams: Any

    @property
    def adversarial(self) -> bool:
        return self.hparams.lambda_gan > 0

    def setup_adversarial(self) -> None:
        hp = self.hparams
        self.discriminator = None
        if not self.adversarial:
            return
        if hp.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {hp.accumulate_grad_batches}")
        self.discriminator = PatchDiscriminator(
            hp.in_channels, DISC_BASE_CHANNELS, DISC_LAYERS, norm=hp.disc_norm
        )
        self.lecam = LeCamEMA() if hp.lecam_weight > 0 else None
        # Two optimisers stepped in one training_step: Lightning requires manual optimisation.
        self.automatic_optimization = False

    def configure_discriminator_optimizer(self) -> dict[str, Any]:
        hp = self.hparams
        lr = hp.disc_learning_rate if hp.disc_learning_rate is not None else hp.learning_rate
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        opt = self._adam(params, lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Automatic optimisation (VQ-VAE): honour ``grad_clip_norm`` when the Trainer sets none."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def _step(self, optimizer, scheduler) -> None:
        if self.hparams.grad_clip_norm:
            # clip_gradients unscales 16-mixed gradients before clipping.
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def _generator_losses(self, x: torch.Tensor, step: int):
        """Generator losses with the adaptive weight, backpropagating through the heavy parts once.

        The image losses (L1, LPIPS) and the GAN loss are taken on a detached copy of the
        reconstruction, so their gradients with respect to it come from one pass through VGG
        and one through the discriminator. ∇_W of each (W: the decoder's last conv) then costs
        only that conv's weight gradient, and the autoencoder's backward runs once, driven by
        ``surrogate``, whose gradient is exactly that of
        λ_rec·L1 + λ_perc·LPIPS + λ_vq·vq + λ_commit·commit + w·G.
        Returns (output, g_loss, weight w, surrogate).
        """
        hp = self.hparams
        q = self.quantize(x)
        x_rec = self.decoder(self.post_quant_conv(q.z_q))
        x_leaf = x_rec.detach().requires_grad_(True)
        out = self.losses(x, x_leaf, q)
        image_nll = hp.lambda_rec * out.recon_loss + hp.lambda_perc * out.perc_loss
        g_loss = generator_loss(self.discriminator(x_leaf), hp.disc_loss)
        # Gradients of unscaled losses can underflow in float16; borrow the loss scale.
        scale = self._loss_scale()
        grad_nll = torch.autograd.grad(image_nll * scale, x_leaf)[0]
        grad_g = torch.autograd.grad(g_loss * scale, x_leaf)[0]
        ramp = ramp_weight(step, hp.disc_start, hp.disc_ramp_steps)
        if hp.adaptive_disc_weight:
            last = self.decoder.last_layer
            w_nll = torch.autograd.grad(x_rec, last, grad_nll, retain_graph=True)[0]
            w_g = torch.autograd.grad(x_rec, last, grad_g, retain_graph=True)[0]
            weight = adaptive_weight_from_grads(w_nll / scale, w_g / scale, max_weight=hp.disc_weight_max)
        else:
            weight = torch.ones((), device=x.device)
        d_weight = weight * (hp.lambda_gan * ramp)
        grad = (grad_nll.float() + d_weight * grad_g.float()) / scale
        vq_terms = hp.lambda_vq * out.vq_loss + hp.lambda_commit * out.commitment_loss
        surrogate = (x_rec.float() * grad.detach()).sum() + vq_terms
        return out, g_loss.detach(), d_weight, surrogate

    def _loss_scale(self) -> float:
        if self._trainer is None:
            return 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def adversarial_training_step(self, x: torch.Tensor) -> None:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        step = self.batches_seen
        accumulate = hp.accumulate_grad_batches
        boundary = (step + 1) % accumulate == 0
        disc_on = step >= hp.disc_start

        # Generator: the discriminator's parameters must not collect the generator's gradients.
        self.toggle_optimizer(opt_g)
        zero = x.new_zeros((), dtype=torch.float32)
        g_loss, d_weight = zero, zero
        if disc_on:
            out, g_loss, d_weight, surrogate = self._generator_losses(x, step)
            loss = surrogate
        else:
            out = self(x)
            loss = out.total_loss
        if not self.nonfinite_guard(loss + out.total_loss + g_loss):  # the surrogate carries the gradients
            self.untoggle_optimizer(opt_g)
            return None
        self.manual_backward(loss / accumulate)
        if boundary:
            self._step(opt_g, sch_g)
        self.untoggle_optimizer(opt_g)

        # Discriminator, on the detached reconstruction of the same forward (no second pass).
        d_value, logits_real, logits_fake = zero, zero, zero
        if disc_on:
            self.toggle_optimizer(opt_d)
            real = self.discriminator(x.detach())
            fake = self.discriminator(out.reconstruction.detach())
            d_value = d_loss(real, fake, hp.disc_loss)
            loss_d = d_value
            if self.lecam is not None:
                self.lecam.update(real, fake)
                loss_d = loss_d + hp.lecam_weight * lecam_loss(real, fake, self.lecam.ema_real, self.lecam.ema_fake)
            self.manual_backward(loss_d / accumulate)
            if boundary:
                self._step(opt_d, sch_d)
            self.untoggle_optimizer(opt_d)
            logits_real, logits_fake = real.detach().float().mean(), fake.detach().float().mean()

        extra = {
            "train/g_loss": g_loss,
            "train/d_loss": d_value.detach(),
            "train/d_weight": d_weight.detach(),
            "train/logits_real": logits_real,
            "train/logits_fake": logits_fake,
        }
        self.after_train_batch(x, out, extra)
