"""One VQ-GAN training batch under manual optimisation (Esser et al. 2021).

Each batch: one autoencoder forward; generator backward → step; then the discriminator on the
*detached* reconstruction of that same forward → step. Lightning's ``global_step`` counts both
optimisers' steps, so the start, ramp and accumulation use the model's own batch counter,
which is saved in checkpoints. The discriminator's learning-rate schedule (warm-up included)
starts when the discriminator does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..nn.tokenizer import Tokenizer, TokenizerOutput
from .guard import NonFiniteGuard
from .objective import Objective, ObjectiveOutput

__all__ = ["GanStep", "GanStepOutput"]


class GanStepOutput(NamedTuple):
    """What a VQ-GAN batch produced, for logging."""

    tokenized: TokenizerOutput
    losses: ObjectiveOutput
    extra: dict[str, torch.Tensor]  # train/g_loss, d_loss, d_weight, logits_real, logits_fake


class GanStep:
    """The two-optimiser step. It is handed the LightningModule whose optimisers it steps
    (``optimizers()``, ``lr_schedulers()``, ``manual_backward``, ``toggle_optimizer``,
    ``clip_gradients``), the tokenizer and the objective, and the non-finite guard.

    Args:
        accumulate_grad_batches: batches whose gradients add up before each step.
        grad_clip_norm: clip each optimiser's gradients to this global norm (None: no clipping).
        after_generator_step: called after each step of the generator's optimiser (the weight EMA's step).
    """

    def __init__(self, tokenizer: Tokenizer, objective: Objective, guard: NonFiniteGuard, *,
                 accumulate_grad_batches: int = 1, grad_clip_norm: float | None = None,
                 after_generator_step: Callable[[], None] | None = None) -> None:
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.tokenizer, self.objective, self.guard = tokenizer, objective, guard
        self.accumulate, self.grad_clip_norm = accumulate_grad_batches, grad_clip_norm
        self.after_generator_step = after_generator_step

    @staticmethod
    def allow_unused_parameters(strategy: Any) -> None:
        """Make a DDP strategy find unused parameters. VQ-GAN's generator backward never reaches
        the discriminator, nor its backward the autoencoder; DDP without find_unused_parameters
        then waits for gradients that never come, and buckets shared with them are never
        all-reduced: ranks silently drift apart. Call it before the model is wrapped (in
        ``setup``)."""
        from lightning.pytorch.strategies import DDPStrategy

        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(strategy, DDPStrategy) and isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info("VQ-GAN under DDP: find_unused_parameters=True (each backward uses half the model)")

    def _step(self, module: Any, optimizer: Any, scheduler: Any) -> None:
        if self.grad_clip_norm:
            # clip_gradients unscales 16-mixed gradients before clipping.
            module.clip_gradients(optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def __call__(self, module: Any, x: torch.Tensor, batch: int, *, loss_scale: float = 1.0,
                 skipped: Callable[[], None] | None = None) -> GanStepOutput | None:
        """Train on images ``x`` (B,C,H,W), the model's batch number ``batch``; None when the
        guard skipped it (``skipped`` is the caller's bookkeeping for that case)."""
        opt_g, opt_d = module.optimizers()
        sch_g, sch_d = module.lr_schedulers()
        boundary = (batch + 1) % self.accumulate == 0
        disc_on = batch >= self.objective.adversarial.disc_start

        # Generator: the discriminator's parameters must not collect the generator's gradients.
        module.toggle_optimizer(opt_g)
        zero = x.new_zeros((), dtype=torch.float32)
        g_loss, d_weight = zero, zero
        tokenized = self.tokenizer(x)
        q = tokenized.quantized
        if disc_on:
            gen = self.objective.generator(x, tokenized.reconstruction, q, batch=batch,
                                           last_layer=self.tokenizer.decoder.last_layer, loss_scale=loss_scale)
            losses, g_loss, d_weight, loss = gen
        else:
            losses = self.objective(x, tokenized.reconstruction, q)
            loss = losses.total_loss
        if not self.guard.check(loss + losses.total_loss + g_loss, batch, skipped=skipped):  # the surrogate carries the gradients
            module.untoggle_optimizer(opt_g)
            return None
        module.manual_backward(loss / self.accumulate)
        if boundary:
            self._step(module, opt_g, sch_g)
            if self.after_generator_step is not None:
                self.after_generator_step()
        module.untoggle_optimizer(opt_g)

        # Discriminator, on the detached reconstruction of the same forward (no second pass).
        d_value, logits_real, logits_fake = zero, zero, zero
        if disc_on:
            module.toggle_optimizer(opt_d)
            disc = self.objective.discriminator_loss(x, tokenized.reconstruction)
            module.manual_backward(disc.loss / self.accumulate)
            if boundary:
                self._step(module, opt_d, sch_d)
            module.untoggle_optimizer(opt_d)
            d_value, logits_real, logits_fake = disc.d_loss, disc.logits_real, disc.logits_fake

        extra = {
            "train/g_loss": g_loss,
            "train/d_loss": d_value,
            "train/d_weight": d_weight.detach(),
            "train/logits_real": logits_real,
            "train/logits_fake": logits_fake,
        }
        return GanStepOutput(tokenized, losses, extra)
