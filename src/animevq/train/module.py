"""``VQVAEModel``: the seed's LightningModule (SPEC §1, §4, §5).

It holds the :class:`~animevq.nn.Tokenizer` as ``self.tokenizer`` (and, with ``ema_decay > 0``,
its weight EMA as ``self.ema_tokenizer``, see :mod:`~animevq.train.ema`) and composes it with the
training :class:`~animevq.train.objective.Objective`, VQ-GAN's :class:`~animevq.train.gan.GanStep`
and the :class:`~animevq.train.guard.NonFiniteGuard`; this file wires them to Lightning's hooks.

Shapes: images (B,C,H,W) in [-1,1]; code indices (B,h,w) or flattened (B,h·w); K codes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..config import SEED_DEFAULTS as _D
from ..config import (
    AdversarialOptions,
    LoggingOptions,
    LossOptions,
    ModelConfig,
    OptimizationOptions,
    SafetyOptions,
    SpeedOptions,
)
from ..nn.config import QuantizerOptions
from ..nn.quantizers import code_stats
from ..nn.tokenizer import Tokenizer
from ..runs.last import LastCheckpoint
from .checkpointing import LPIPS_PREFIX, load_training_state, save_training_state
from .ema import ema_copy, ema_update
from .gan import GanStep
from .guard import NonFiniteGuard
from .monitor import CodeUsage, TrainingMonitor, log_grid, log_usage_histogram, report
from .objective import Objective, VQVAEOutput, family_losses
from .optim import adam_options, apply_adam_options, make_scheduler
from .pretrained import read_pretrained_model
from .speed import speed_up

__all__ = ["LPIPS_PREFIX", "VQVAEModel", "VQVAEOutput"]


class VQVAEModel(pl.LightningModule):
    """VQ-VAE (and, with ``lambda_gan > 0``, VQ-GAN) image tokenizer.

    The first twenty parameters are the seed's table, with its names and defaults; the
    keyword-only groups hold everything else, one dataclass per concern (``animevq.config``).

    Args:
        in_channels: Image channels.
        latent_channels: Channels of the encoder's output and the decoder's input.
        encoder_channels: Width of each encoder stage; every stage halves the image side.
        decoder_channels: Width of each decoder stage; every stage doubles it.
        num_res_blocks: ResBlocks per stage.
        num_embeddings: Codebook size K.
        embedding_dim: Code dimension D; 1×1 convs project when it differs from latent_channels.
        commitment_cost: β of the quantizer's own loss when used alone (the model uses lambda_commit).
        decay: EMA decay of the codebook; 0 trains the codebook by gradient.
        lambda_rec: Weight of the L1 reconstruction loss.
        lambda_vq: Weight of the codebook loss mse(z_q, sg[z_e]).
        lambda_commit: Weight of the commitment loss mse(z_e, sg[z_q]).
        lambda_perc: Weight of the LPIPS perceptual loss.
        lambda_gan: Weight of the adversarial loss; > 0 makes a VQ-GAN.
        use_lpips: Build the LPIPS network (needs VGG16 weights, see losses).
        learning_rate: Adam's learning rate.
        betas: Adam's betas.
        weight_decay: Adam's weight decay.
        log_every_n_steps: Log scalars every N training batches.
        log_images_every_n_steps: Log train/reconstruction every N training batches.
        quantizer: The quantizer family (vq, fsq, lfq, simvq, ibq) and its options: VQ-EMA's codebook
            health, FSQ's levels, LFQ's entropy loss (see ``configs/quantizer/``).
        losses: Where LPIPS's VGG16 weights come from.
        adversarial: VQ-GAN's discriminator and its schedule.
        optimization: Learning-rate schedule, gradient clipping, VQ-GAN's accumulation, weight EMA.
        logging: The window behind the logged training code usage.
        speed: channels_last and torch.compile.
        safety: How many non-finite batches in a row are skipped before the run stops.
    """

    def __init__(
        self,
        in_channels: int = _D["in_channels"],
        latent_channels: int = _D["latent_channels"],
        encoder_channels: tuple[int, ...] = _D["encoder_channels"],
        decoder_channels: tuple[int, ...] = _D["decoder_channels"],
        num_res_blocks: int = _D["num_res_blocks"],
        num_embeddings: int = _D["num_embeddings"],
        embedding_dim: int = _D["embedding_dim"],
        commitment_cost: float = _D["commitment_cost"],
        decay: float = _D["decay"],
        lambda_rec: float = _D["lambda_rec"],
        lambda_vq: float = _D["lambda_vq"],
        lambda_commit: float = _D["lambda_commit"],
        lambda_perc: float = _D["lambda_perc"],
        lambda_gan: float = _D["lambda_gan"],
        use_lpips: bool = _D["use_lpips"],
        learning_rate: float = _D["learning_rate"],
        betas: tuple[float, float] = _D["betas"],
        weight_decay: float = _D["weight_decay"],
        log_every_n_steps: int = _D["log_every_n_steps"],
        log_images_every_n_steps: int = _D["log_images_every_n_steps"],
        *,
        quantizer: QuantizerOptions = QuantizerOptions(),
        losses: LossOptions = LossOptions(),
        adversarial: AdversarialOptions = AdversarialOptions(),
        optimization: OptimizationOptions = OptimizationOptions(),
        logging: LoggingOptions = LoggingOptions(),
        speed: SpeedOptions = SpeedOptions(),
        safety: SafetyOptions = SafetyOptions(),
    ) -> None:
        arguments = locals()
        super().__init__()
        seed = {name: arguments[name] for name in _D}
        groups = {"quantizer": quantizer, "losses": losses, "adversarial": adversarial, "optimization": optimization,
                  "logging": logging, "speed": speed, "safety": safety}
        self.config = config = ModelConfig.build(seed, groups)
        self.save_hyperparameters(config.to_hparams())  # plain values only: checkpoints load weights_only
        self.tokenizer = Tokenizer(config.tokenizer)
        # Copied before speed_up compiles the live networks; validated, evaluated and exported.
        self.ema_tokenizer = ema_copy(self.tokenizer) if config.optimization.ema_decay > 0 else None
        self.objective = Objective(config.losses, config.adversarial, config.tokenizer.in_channels,
                                   self.tokenizer.quantizer.loss_weights)
        self.usage = CodeUsage(config.logging.usage_window, self.tokenizer.codebook_size)
        self.batches_seen = 0  # our batch counter: global_step counts optimizer steps
        self.guard = NonFiniteGuard(config.safety.max_nonfinite_steps, [self.tokenizer.quantizer, self.objective])
        self.monitor = TrainingMonitor()
        self._prepared = False
        self.gan_step: GanStep | None = None
        if self.adversarial:
            self.gan_step = GanStep(self.tokenizer, self.objective, self.guard,
                                    accumulate_grad_batches=config.optimization.accumulate_grad_batches,
                                    grad_clip_norm=config.optimization.grad_clip_norm,
                                    after_generator_step=self.update_ema)
            # Two optimisers stepped in one training_step: Lightning requires manual optimisation.
            self.automatic_optimization = False

    @property
    def adversarial(self) -> bool:
        """VQ-GAN (``lambda_gan > 0``)."""
        return self.config.adversarial_on

    # ------------------------------------------------------------------ inference API
    @property
    def inference_tokenizer(self) -> Tokenizer:
        """What ``forward``, ``encode`` and ``decode`` use: in eval mode (validation included) the
        weight EMA when ``ema_decay > 0``, else, and always in training mode, the live tokenizer."""
        return self.ema_tokenizer if self.ema_tokenizer is not None and not self.training else self.tokenizer

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruct ``x`` (B,C,H,W) in [-1,1] with :attr:`inference_tokenizer` and compute every
        named loss and metric."""
        tokenized = self.inference_tokenizer(x)
        return VQVAEOutput.of(tokenized, self.objective(x, tokenized.reconstruction, tokenized.quantized),
                              tokenized.reconstruction)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) in [-1,1] → code indices (B,h·w) int64 in [0,K). Never updates the codebook."""
        return self.inference_tokenizer.encode(x)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B,h·w) (square grid) or (B,h,w) → images (B,C,16h,16w) in [-1,1]."""
        return self.inference_tokenizer.decode(indices)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        map_location: str | torch.device = "cpu", **overrides: Any) -> VQVAEModel:
        """A model (eval mode) holding the weights of an export, a local folder or a Hub repo id
        (the arguments of :meth:`Tokenizer.from_pretrained <animevq.nn.Tokenizer.from_pretrained>`).
        ``overrides`` set constructor arguments (seed parameters, or groups as mappings); LPIPS is
        off unless ``use_lpips=True`` is passed. A 0.1 export also brings its training settings;
        a VQ-GAN's discriminator starts fresh (exports hold none), a weight EMA from the same weights."""
        hparams, tokenizer = read_pretrained_model(
            pretrained_model_name_or_path, overrides, revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token)
        model = cls(**hparams)
        for part in (model.tokenizer, model.ema_tokenizer):
            if part is not None:
                part.load_state_dict(tokenizer.state_dict())
        return model.eval().to(map_location)

    # ------------------------------------------------------------------ speed
    def setup(self, stage: str) -> None:
        """Before the model reaches the device and the optimisers exist: memory format and compilation."""
        if self._prepared:
            return
        self._prepared = True
        if self.gan_step is not None:
            self.gan_step.allow_unused_parameters(self.trainer.strategy)
        on_cuda = self._trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        speed_up(self, self.config.speed, on_cuda=on_cuda)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.config.speed.channels_last and isinstance(batch, torch.Tensor) and batch.is_cuda and batch.dim() == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    # ------------------------------------------------------------------ training
    @staticmethod
    def images_of(batch: Any) -> torch.Tensor:
        """The (B,C,H,W) images of a batch: a tensor, a (images, ...) sequence or {'image': ...}."""
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (dict, list, tuple)):
            return batch["image"] if isinstance(batch, dict) else batch[0]
        raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x = self.images_of(batch)
        self.guard.snapshot()
        if self.gan_step is not None:
            step = self.gan_step(self, x, self.batches_seen, loss_scale=self._loss_scale(), skipped=self._skipped)
            if step is not None:
                self.after_train_batch(x, VQVAEOutput.of(step.tokenized, step.losses, step.tokenized.reconstruction),
                                       step.extra)
            return None
        out = self(x)
        if not self.guard.check(out.total_loss, self.batches_seen, skipped=self._skipped):
            # Lightning's own skip (returning None) is refused under DDP: a zero gradient instead,
            # and optimizer_step does not step.
            self.guard.skip_optimizer_step = True
            return self.guard.zero_gradient_loss([p for p in self.parameters() if p.requires_grad])
        self.after_train_batch(x, out, extra={})
        return out.total_loss

    def _skipped(self) -> None:
        """Bookkeeping of a batch the guard skipped on the host: it used no codes."""
        self.usage.record(self.batches_seen, 0)
        self.batches_seen += 1

    def _loss_scale(self) -> float:
        if self._trainer is None:
            return 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def after_train_batch(self, x: torch.Tensor, out: VQVAEOutput, extra: dict[str, torch.Tensor]) -> None:
        """Bookkeeping after each training batch: usage window, scalars and images at their cadence."""
        cadence = self.config.logging
        self.usage.record(self.batches_seen, self.guard.finish(out.counts))
        step = self.batches_seen
        self.batches_seen += 1
        scalars, images = step % cadence.log_every_n_steps == 0, step % cadence.log_images_every_n_steps == 0
        if scalars or images:
            self.guard.settle()  # a skipped batch has nothing to show
            if self.guard.last_skipped_batch == step:
                return
        if scalars:
            values = {
                "train/recon_loss": out.recon_loss,
                "train/vq_loss": out.vq_loss,
                "train/commitment_loss": out.commitment_loss,
                "train/perc_loss": out.perc_loss,
                "train/total_loss": out.total_loss,
                "train/batch_perplexity": out.perplexity,
                "train/batch_code_usage_rate": out.code_usage_rate,
                "train/restarted_codes": out.restarted.float(),
                **family_losses(out, "train/"),
                **extra,
            }
            self.monitor.log_train_scalars(self, self.usage, batches_seen=self.batches_seen, batch_size=x.shape[0],
                                           values=values, extra={"train/skipped_nonfinite": float(self.guard.total)})
        if images:
            log_grid(self, "train/reconstruction", x, out.reconstruction, self.batches_seen)

    def on_train_start(self) -> None:
        trainer = self.trainer
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]  # a resume restored both
        for optimizer, scheduler, (_, options) in zip(trainer.optimizers, schedulers, self._adam_plan()):
            apply_adam_options(optimizer, scheduler, options)  # the resumed run's settings, not the checkpoint's
        accumulate = (self.config.optimization.accumulate_grad_batches if self.adversarial
                      else trainer.accumulate_grad_batches)
        distributed = trainer.world_size > 1
        self.guard.start(
            list(trainer.optimizers), loss_scaler=getattr(trainer.precision_plugin, "scaler", None),
            accumulate_grad_batches=accumulate, device=self.usage.history.device, distributed=distributed,
            agree=(lambda ok: trainer.strategy.reduce_boolean_decision(ok, all=True)) if distributed else bool,
            report=lambda message: report(self, message, {"train/skipped_nonfinite": float(self.guard.total)},
                                          self.batches_seen),
            where_to_resume=self._where_to_resume,
        )

    def _where_to_resume(self) -> str:
        for callback in self.trainer.callbacks:
            if isinstance(callback, LastCheckpoint) and callback.last_saved_batch is not None:
                return f"the last good checkpoint is {callback.path} (batch {callback.last_saved_batch})"
        return "no checkpoint was written yet"

    def on_train_epoch_end(self) -> None:
        self.guard.settle()

    def on_train_end(self) -> None:
        self.guard.stop()

    def checkpoint_blocked(self) -> bool:
        """Whether a checkpoint must not be written now: within a run of non-finite losses
        (``LastCheckpoint`` asks; every rank decides alike)."""
        self.guard.settle()  # the device's count of bad batches in a row, as of now
        return self.guard.streak > 0

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step (once per accumulated batch), unless the guard skipped the batch (see
        ``training_step``); then the weight EMA's."""
        if optimizer_closure is not None:
            self.guard.skip_optimizer_step = False
            loss = optimizer_closure()  # training_step and backward, as the optimizer would run them
            if self.guard.skip_optimizer_step:
                self.guard.skip_optimizer_step = False
                return
            optimizer_closure = lambda: loss  # noqa: E731
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_ema()

    def update_ema(self) -> None:
        """The weight EMA's step after each of the tokenizer's optimiser (none without ema_decay). A
        batch the guard skipped leaves it as it was; a step a float16 loss scaler skipped does not."""
        if self.ema_tokenizer is not None:
            ema_update(self.ema_tokenizer, self.tokenizer, decay=self.config.optimization.ema_decay,
                       skip=self.guard.device_skip)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Automatic optimisation (VQ-VAE): honour ``grad_clip_norm`` when the Trainer sets none."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.config.optimization.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.usage.val_counts.zero_()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.images_of(batch)
        out = self(x)
        self.usage.val_counts += out.counts
        values = {
            "val/recon_loss": out.recon_loss,
            "val/vq_loss": out.vq_loss,
            "val/commitment_loss": out.commitment_loss,
            "val/perc_loss": out.perc_loss,
            "val/total_loss": out.total_loss,
            **family_losses(out, "val/"),
        }
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and not self.trainer.sanity_checking:
            log_grid(self, "val/reconstruction", x, out.reconstruction, self.batches_seen)
        return out.total_loss

    def on_validation_epoch_end(self) -> None:
        counts = self.usage.val_counts
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        perplexity, usage = code_stats(counts)
        # Already global: no further reduction.
        self.log("val/perplexity", perplexity, on_epoch=True, sync_dist=False, rank_zero_only=True)
        self.log("val/code_usage_rate", usage, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            log_usage_histogram(self, counts, self.batches_seen)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        cfg = self.config.optimization
        total = None
        if cfg.lr_schedule == "cosine" and self._trainer is not None:
            estimated = self.trainer.estimated_stepping_batches
            total = int(estimated) if math.isfinite(estimated) else None
        configs = []
        for params, options in self._adam_plan():
            opt = torch.optim.Adam(params, **options)
            configs.append({"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt, cfg, total),
                                                                "interval": "step"}})
        return configs

    def _adam_plan(self) -> list[tuple[list[nn.Parameter], dict[str, Any]]]:
        """Each optimiser's parameters and Adam settings: the tokenizer's, then the discriminator's."""
        cfg, disc_lr = self.config.optimization, self.config.adversarial.disc_learning_rate
        clipping = bool(cfg.grad_clip_norm or (self._trainer is not None and self.trainer.gradient_clip_val))
        parts = [(self.tokenizer, cfg.learning_rate)]
        if self.adversarial:
            parts.append((self.objective.discriminator, cfg.learning_rate if disc_lr is None else disc_lr))
        plan = []
        for module, lr in parts:
            params = [p for p in module.parameters() if p.requires_grad]
            plan.append((params, adam_options(params, cfg, lr=lr, clipping=clipping)))
        return plan

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_training_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_training_state(self, checkpoint)
