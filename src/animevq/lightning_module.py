"""``VQVAEModel``: the seed's LightningModule (SPEC §1, §4, §5).

Shapes: images (B,C,H,W) in [-1,1]; latents (B,D,h,w) with h = H/16, w = W/16;
code indices (B,h,w) or flattened (B,h·w); K codes.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .gan import AdversarialMixin
from .nn.autoencoder import Decoder, Encoder
from .nn.quantizer import VectorQuantizerEMA, code_stats
from .reliability import NonFiniteGuardMixin, architecture_differences
from .schedules import warmup_cosine
from .tracking.images import code_usage_plot, make_reconstruction_grid
from .tracking.media import log_image

__all__ = ["VQVAEModel", "VQVAEOutput"]

SEED_DEFAULTS: dict[str, Any] = {  # the seed's parameter table, promised to users
    "in_channels": 3,
    "latent_channels": 256,
    "encoder_channels": (128, 256, 256, 256),
    "decoder_channels": (256, 256, 256, 128),
    "num_res_blocks": 2,
    "num_embeddings": 1024,
    "embedding_dim": 256,
    "commitment_cost": 0.25,
    "decay": 0.99,
    "lambda_rec": 1.0,
    "lambda_vq": 1.0,
    "lambda_commit": 0.25,
    "lambda_perc": 0.5,
    "lambda_gan": 0.0,
    "use_lpips": True,
    "learning_rate": 2e-4,
    "betas": (0.9, 0.99),
    "weight_decay": 0.0,
    "log_every_n_steps": 100,
    "log_images_every_n_steps": 500,
}
NUM_LOGGED_IMAGES = 8  # images per reconstruction grid


class VQVAEOutput(NamedTuple):
    """What ``VQVAEModel.forward`` returns."""

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


class VQVAEModel(AdversarialMixin, NonFiniteGuardMixin, pl.LightningModule):
    """VQ-VAE (and, with ``lambda_gan > 0``, VQ-GAN) image tokenizer.

    The first twenty parameters are the seed's table, with its names and defaults.
    The keyword-only ones add what the seed left out: LPIPS weights, codebook health,
    the learning-rate schedule and the adversarial settings (see ``animevq.gan``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 256,
        encoder_channels: tuple[int, ...] = (128, 256, 256, 256),
        decoder_channels: tuple[int, ...] = (256, 256, 256, 128),
        num_res_blocks: int = 2,
        num_embeddings: int = 1024,
        embedding_dim: int = 256,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        lambda_rec: float = 1.0,
        lambda_vq: float = 1.0,
        lambda_commit: float = 0.25,
        lambda_perc: float = 0.5,
        lambda_gan: float = 0.0,
        use_lpips: bool = True,
        learning_rate: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        log_every_n_steps: int = 100,
        log_images_every_n_steps: int = 500,
        *,
        lpips_vgg_weights: str | None = None,  # local torchvision VGG16 state dict
        lpips_random_init: bool = False,  # tests and smoke runs only: a random VGG
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 0.125,
        restart_sampling: Literal["error", "uniform"] = "error",  # how restart vectors are drawn (quantizer docs)
        kmeans_init: bool = False,
        l2_normalize_codes: bool = False,
        usage_window: int = 100,  # batches behind train/code_usage_rate
        warmup_steps: int = 1000,
        lr_schedule: str = "cosine",  # "cosine" or "constant" after warm-up
        min_lr_ratio: float = 0.1,
        disc_start: int = 10000,
        disc_ramp_steps: int = 0,
        disc_loss: str = "hinge",
        disc_norm: str = "batch",
        disc_learning_rate: float | None = None,
        adaptive_disc_weight: bool = True,
        disc_weight_max: float = 1e4,
        lecam_weight: float = 0.0,
        grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        channels_last: bool = True,  # NHWC on CUDA: what cuDNN's bf16 tensor-core convs want
        compile: bool = False,  # torch.compile the networks (fuses GroupNorm+SiLU); GPU presets turn it on
        max_nonfinite_steps: int | None = 10,  # skipped NaN/inf batches in a row before the run stops; None: no guard
    ) -> None:
        super().__init__()
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if max_nonfinite_steps is not None and max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 or None (no guard), got {max_nonfinite_steps}")
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"encoder_channels {encoder_channels} and decoder_channels {decoder_channels} "
                "must have the same number of stages"
            )
        encoder_channels, decoder_channels = tuple(encoder_channels), tuple(decoder_channels)
        betas = (float(betas[0]), float(betas[1]))
        self.save_hyperparameters()
        self.encoder = Encoder(in_channels, encoder_channels, num_res_blocks, latent_channels)
        self.decoder = Decoder(in_channels, decoder_channels, num_res_blocks, latent_channels)
        project = latent_channels != embedding_dim
        self.quant_conv = nn.Conv2d(latent_channels, embedding_dim, 1) if project else nn.Identity()
        self.post_quant_conv = nn.Conv2d(embedding_dim, latent_channels, 1) if project else nn.Identity()
        self.quantizer = VectorQuantizerEMA(
            num_embeddings,
            embedding_dim,
            commitment_cost,
            decay,
            restart_dead_codes=restart_dead_codes,
            dead_code_threshold=dead_code_threshold,
            restart_sampling=restart_sampling,
            kmeans_init=kmeans_init,
            l2_normalize=l2_normalize_codes,
        )
        self.lpips: nn.Module | None = None
        if use_lpips:
            from .nn.lpips import LPIPS

            self.lpips = LPIPS(vgg_weights=lpips_vgg_weights, random_init=lpips_random_init)
        # Running code histogram over the last `usage_window` batches (train/ usage metrics).
        self.register_buffer("usage_history", torch.zeros(usage_window, num_embeddings), persistent=False)
        self.register_buffer("val_counts", torch.zeros(num_embeddings), persistent=False)
        self.batches_seen = 0  # our batch counter: global_step counts optimizer steps
        self.setup_nonfinite_guard()
        self._prepared = False
        self._images_seen_at_log = 0
        self._time_at_log: float | None = None
        self.setup_adversarial()

    # ------------------------------------------------------------------ inference API
    def quantize(self, x: torch.Tensor):
        """(B,C,H,W) → quantiser output on the (B,D,h,w) latents."""
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruct ``x`` (B,C,H,W) in [-1,1] and compute every named loss and metric."""
        q = self.quantize(x)
        return self.losses(x, self.decoder(self.post_quant_conv(q.z_q)), q)

    def losses(self, x: torch.Tensor, x_rec: torch.Tensor, q) -> VQVAEOutput:
        """Every named loss and metric of a reconstruction ``x_rec`` of ``x`` and its quantiser output ``q``."""
        recon_loss = F.l1_loss(x_rec.float(), x.float())
        perc_loss = self.lpips(x, x_rec, reduction="mean") if self.lpips is not None else recon_loss.new_zeros(())
        hp = self.hparams
        total = (
            hp.lambda_rec * recon_loss
            + hp.lambda_vq * q.vq_loss
            + hp.lambda_commit * q.commitment_loss
            + hp.lambda_perc * perc_loss
        )
        return VQVAEOutput(
            reconstruction=x_rec,
            indices=q.indices,
            recon_loss=recon_loss,
            vq_loss=q.vq_loss,
            commitment_loss=q.commitment_loss,
            perc_loss=perc_loss,
            total_loss=total,
            perplexity=q.perplexity,
            code_usage_rate=q.code_usage_rate,
            counts=q.counts,
            restarted=q.restarted,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) in [-1,1] → code indices (B,h·w) int64 in [0,K). Never updates the codebook."""
        indices = self.quantizer.quantize_indices(self.quant_conv(self.encoder(x)))  # (B,h,w)
        return indices.flatten(1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B,h·w) (square grid) or (B,h,w) → images (B,C,16h,16w) in [-1,1]."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(
                    f"flat indices of length {indices.shape[1]} are not a square grid; pass them as (B,h,w)"
                )
            indices = indices.view(indices.shape[0], side, side)
        elif indices.dim() != 3:
            raise ValueError(f"indices must be (B,h·w) or (B,h,w), got shape {tuple(indices.shape)}")
        z_q = self.quantizer.lookup(indices.to(self.quantizer.codebook.device))
        return self.decoder(self.post_quant_conv(z_q))

    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any) -> "VQVAEModel":
        """Load weights exported by ``animevq export`` (safetensors + config.json, no pickle)."""
        from .export import load_pretrained

        return load_pretrained(directory, **overrides)

    # ------------------------------------------------------------------ speed
    def setup(self, stage: str) -> None:
        """Before the model reaches the device and the optimisers exist: memory format and compilation."""
        if self._prepared:
            return
        self._prepared = True
        if self.adversarial:
            self._allow_unused_parameters_under_ddp()
        on_cuda = self._trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        if self.hparams.channels_last and on_cuda:
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            # In place (Module.compile), so state-dict keys stay the same. The quantiser stays
            # eager: it updates buffers in place and its cost is small. For VQ-GAN the decoder's
            # head stays eager: the adaptive weight differentiates through its last conv alone,
            # which a compiled backward could only do by running the whole decoder's backward.
            decoder = self.decoder.stages if self.adversarial else self.decoder
            for module in (self.encoder, decoder, self.lpips, self.discriminator):
                if module is not None:
                    module.compile()

    def _allow_unused_parameters_under_ddp(self) -> None:
        """VQ-GAN's generator backward never reaches the discriminator, nor its backward the
        autoencoder. DDP without find_unused_parameters then waits for gradients that never
        come, and buckets shared with them are never all-reduced: ranks silently drift apart.
        The model is wrapped by DDP after this hook, so the setting still applies."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(strategy, DDPStrategy) and isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info("VQ-GAN under DDP: find_unused_parameters=True (each backward uses half the model)")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.channels_last and isinstance(batch, torch.Tensor) and batch.is_cuda and batch.dim() == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    # ------------------------------------------------------------------ training
    @staticmethod
    def images_of(batch: Any) -> torch.Tensor:
        """The (B,C,H,W) images of a batch: a tensor, a (images, ...) sequence or {'image': ...}."""
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, dict):
            return batch["image"]
        if isinstance(batch, (list, tuple)):
            return batch[0]
        raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x = self.images_of(batch)
        self._snapshot_quantizer()
        if self.adversarial:
            return self.adversarial_training_step(x)
        out = self(x)
        if not self.nonfinite_guard(out.total_loss):
            return self.skipped_step_loss()  # zero gradients; optimizer_step will not step
        self.after_train_batch(x, out, extra={})
        return out.total_loss

    def after_train_batch(self, x: torch.Tensor, out: VQVAEOutput, extra: dict[str, torch.Tensor]) -> None:
        """Bookkeeping after each training batch: usage window, scalars and images at their cadence."""
        hp = self.hparams
        self.usage_history[self.batches_seen % hp.usage_window] = self._finish_guarded_batch(out.counts)
        step = self.batches_seen
        self.batches_seen += 1
        scalars, images = step % hp.log_every_n_steps == 0, step % hp.log_images_every_n_steps == 0
        if scalars or images:
            self.settle_nonfinite()  # a skipped batch has nothing to show
            if self.last_skipped_batch == step:
                return
        if scalars:
            self._log_train_scalars(x.shape[0], out, extra)
        if images:
            self._log_grid("train/reconstruction", x, out.reconstruction)

    def on_train_start(self) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        accumulate = self.hparams.accumulate_grad_batches if self.adversarial else self.trainer.accumulate_grad_batches
        self.start_nonfinite_guard(list(self.trainer.optimizers), scaler, accumulate)

    def on_train_epoch_end(self) -> None:
        self.settle_nonfinite()

    def on_train_end(self) -> None:
        self.stop_nonfinite_guard()

    def _log_train_scalars(self, batch_size: int, out: VQVAEOutput, extra: dict[str, torch.Tensor]) -> None:
        window = self.usage_history.sum(0)
        if self.trainer.world_size > 1:  # every rank logs on the same batches: a safe collective
            window = self.trainer.strategy.reduce(window, reduce_op="sum")
        perplexity, usage = code_stats(window)
        values = {
            "train/recon_loss": out.recon_loss,
            "train/vq_loss": out.vq_loss,
            "train/commitment_loss": out.commitment_loss,
            "train/perc_loss": out.perc_loss,
            "train/total_loss": out.total_loss,
            "train/perplexity": perplexity,
            "train/code_usage_rate": usage,
            "train/batch_perplexity": out.perplexity,
            "train/batch_code_usage_rate": out.code_usage_rate,
            "train/restarted_codes": out.restarted.float(),
            **extra,
        }
        numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()  # one sync
        metrics = dict(zip(values, numbers))
        metrics["train/skipped_nonfinite"] = float(self.nonfinite_total)
        for i, opt in enumerate(self._optimizers()):
            metrics[f"train/lr{'' if i == 0 else '_disc'}"] = opt.param_groups[0]["lr"]
        now = time.perf_counter()
        images = self.batches_seen * batch_size * self.trainer.world_size
        if self._time_at_log is not None and now > self._time_at_log:
            metrics["train/images_per_sec"] = (images - self._images_seen_at_log) / (now - self._time_at_log)
        self._time_at_log, self._images_seen_at_log = now, images
        # A host tensor: Lightning keeps a logged value on its tensor's device and reads the
        # progress bar's values back after every batch — from the GPU, a host sync per step.
        total = torch.tensor(metrics["train/total_loss"])
        self.log("train/total_loss", total, prog_bar=True, logger=False, batch_size=batch_size)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.batches_seen)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _log_grid(self, key: str, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        if not self.trainer.is_global_zero or not self.loggers:
            return
        grid = make_reconstruction_grid(x[:NUM_LOGGED_IMAGES], x_rec[:NUM_LOGGED_IMAGES].detach())
        for logger in self.loggers:
            log_image(logger, key, grid, step=self.batches_seen)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.images_of(batch)
        out = self(x)
        self.val_counts += out.counts
        values = {
            "val/recon_loss": out.recon_loss,
            "val/vq_loss": out.vq_loss,
            "val/commitment_loss": out.commitment_loss,
            "val/perc_loss": out.perc_loss,
            "val/total_loss": out.total_loss,
        }
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_grid("val/reconstruction", x, out.reconstruction)
        return out.total_loss

    def on_validation_epoch_end(self) -> None:
        counts = self.val_counts
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        perplexity, usage = code_stats(counts)
        # Already global: no further reduction.
        self.log("val/perplexity", perplexity, on_epoch=True, sync_dist=False, rank_zero_only=True)
        self.log("val/code_usage_rate", usage, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.log_usage_histogram(counts)

    def log_usage_histogram(self, counts: torch.Tensor) -> None:
        if not self.trainer.is_global_zero or not self.loggers:
            return
        plot = code_usage_plot(counts.detach().cpu())
        for logger in self.loggers:
            log_image(logger, "val/code_usage", plot, step=self.batches_seen)

    # ------------------------------------------------------------------ optimisation
    def autoencoder_parameters(self) -> list[nn.Parameter]:
        modules = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv, self.quantizer)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        hp = self.hparams
        total = None
        if hp.lr_schedule == "cosine" and self._trainer is not None:
            estimated = self.trainer.estimated_stepping_batches
            total = int(estimated) if math.isfinite(estimated) else None
        warmup = hp.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=hp.min_lr_ratio),
        )

    def _adam(self, params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
        hp = self.hparams
        # Fused Adam updates all tensors in one kernel, but Lightning cannot clip its gradients
        # under mixed precision (it unscales internally): clipping runs use the foreach kernel.
        clipping = hp.grad_clip_norm or (self._trainer is not None and self.trainer.gradient_clip_val)
        # Fused also lets the non-finite guard skip a step without a host synchronisation.
        fused = {p.device.type for p in params} in ({"cuda"}, {"cpu"}) and not clipping
        return torch.optim.Adam(params, lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=fused)

    def configure_optimizers(self) -> Any:
        opt = self._adam(self.autoencoder_parameters(), self.hparams.learning_rate)
        configs = [{"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}]
        if self.adversarial:
            configs.append(self.configure_discriminator_optimizer())
        return configs

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.settle_nonfinite()  # nonfinite_total as of now
        # The frozen LPIPS network is rebuilt from its weights file, not stored per run.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("lpips.")]:
            del state[key]
        checkpoint["animevq"] = {
            "batches_seen": self.batches_seen,
            "nonfinite_total": self.nonfinite_total,
            # Not in the state dict (exports stay lean), but the logged usage window continues.
            "usage_history": self.usage_history.detach().clone(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, dict):
            differences = architecture_differences(saved, dict(self.hparams))
            if differences:
                source = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
                raise CheckpointError(
                    f"checkpoint {source or ''} was written by a different model, so it cannot be loaded into "
                    f"this one: {'; '.join(differences)}. Resume with the settings it was trained with (its "
                    "hyper_parameters, or config.yaml in its run folder), or start a new run without --ckpt_path."
                )
        if self.lpips is not None:
            for key, value in self.lpips.state_dict().items():
                checkpoint["state_dict"].setdefault(f"lpips.{key}", value)
        ours = checkpoint.get("animevq", {})
        self.batches_seen = int(ours.get("batches_seen", 0))
        self.nonfinite_total = int(ours.get("nonfinite_total", 0))
        history = ours.get("usage_history")
        if isinstance(history, torch.Tensor) and history.shape == self.usage_history.shape:
            self.usage_history.copy_(history)
