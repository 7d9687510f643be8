"""Typed settings of a training run: the one place every default lives.

``VQVAEModel`` takes the seed's twenty parameters flat (its README's table, names and defaults
promised to users) and every other knob in a group, one dataclass per concern:
``quantizer`` (:class:`~animevq.nn.quantizer_config.QuantizerOptions`: the family and its
options), ``losses`` (:class:`LossOptions`),
``adversarial``, ``optimization``, ``logging``, ``speed`` and ``safety``. Each seed parameter
is a field of the config of the part it belongs to, beside that group's options
(``LossConfig(LossOptions)`` adds the loss weights, and so on), so its default is written once;
:data:`SEED_DEFAULTS` and :data:`ARCHITECTURE_KEYS` are derived from these classes.

``ModelConfig`` gathers everything a model is built from. ``ModelConfig.from_hparams`` reads
a checkpoint's hyperparameters, those of animevq 0.1 (all flat) included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .nn.config import (
    Checked,
    QuantizerOptions,
    TokenizerConfig,
    VQConfig,
    VQOptions,
    config_from_mapping,
    flat_of_quantizer,
    plain,
    quantizer_from_flat,
)
from .nn.discriminator import BASE_CHANNELS, DiscriminatorNorm

__all__ = [
    "ARCHITECTURE_KEYS",
    "GROUPS",
    "MOVED_IN_0_2",
    "SEED_DEFAULTS",
    "SEED_PARAMETERS",
    "AdversarialOptions",
    "DiscLoss",
    "LoggingConfig",
    "LoggingOptions",
    "LossConfig",
    "LossOptions",
    "ModelConfig",
    "OptimizationOptions",
    "OptimizerConfig",
    "SafetyOptions",
    "SpeedOptions",
]

DiscLoss = Literal["hinge", "nonsaturating"]
LrSchedule = Literal["cosine", "constant"]
# The modes that capture CUDA graphs ("reduce-overhead", "max-autotune") are not offered: not
# tried with Lightning's training step and VQ-GAN's several backward passes per step.
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]


def _check_choice(name: str, value: Any, kind: Any) -> None:
    if value not in get_args(kind):
        raise ValueError(f"{name} must be one of {get_args(kind)}, got {value!r}")


@dataclass(frozen=True)
class LossOptions(Checked):
    """Where LPIPS's weights come from (``--model.losses.*``)."""

    lpips_vgg_weights: str | None = None
    """A local torchvision VGG16 state dict for LPIPS; None: torchvision's cache (TORCH_HOME)."""
    lpips_random_init: bool = False
    """A randomly initialised VGG16: for tests and smoke runs only (LPIPS is then not perceptual)."""


@dataclass(frozen=True)
class LossConfig(LossOptions):
    """The training objective: total = λ_rec·L1 + λ_vq·vq + λ_commit·commit + λ_perc·LPIPS + λ_gan·G."""

    lambda_rec: float = 1.0
    """Weight of the L1 reconstruction loss."""
    lambda_vq: float = 1.0
    """Weight of the codebook loss mse(z_q, sg[z_e]) (it trains the codebook only when decay = 0)."""
    lambda_commit: float = 0.25
    """Weight of the commitment loss mse(z_e, sg[z_q]) (the VQ-VAE paper's β)."""
    lambda_perc: float = 0.5
    """Weight of the LPIPS perceptual loss."""
    lambda_gan: float = 0.0
    """Weight of the adversarial loss; > 0 makes the model a VQ-GAN."""
    use_lpips: bool = True
    """Build the LPIPS network (VGG16 weights needed unless lpips_random_init)."""


@dataclass(frozen=True)
class AdversarialOptions(Checked):
    """VQ-GAN's discriminator and its schedule (``--model.adversarial.*``); used when lambda_gan > 0."""

    disc_start: int = 10000
    """Training batch at which the discriminator and the GAN loss start (taming's disc_start)."""
    disc_ramp_steps: int = 0
    """Batches over which the GAN weight ramps linearly from 0 to 1 after disc_start (0: at once)."""
    disc_loss: DiscLoss = "hinge"
    """Discriminator loss: "hinge" (taming) or "nonsaturating" (cross-entropy on logits)."""
    disc_norm: DiscriminatorNorm = "batch"
    """The discriminator's normalisation: "batch" (taming), "group", "none" or "spectral"."""
    disc_channels: int = BASE_CHANNELS
    """Width of the discriminator's first layer (64 in pix2pix and taming)."""
    disc_learning_rate: float | None = None
    """The discriminator's learning rate; None: learning_rate."""
    adaptive_disc_weight: bool = True
    """Balance the GAN loss by ‖∇L_rec‖ / ‖∇L_G‖ at the decoder's last layer (Esser et al. 2021, eq. 7)."""
    disc_weight_max: float = 1e4
    """Clamp of that adaptive weight (taming's)."""
    lecam_weight: float = 0.0
    """Weight of LeCam regularisation of the discriminator (Tseng et al. 2021; e.g. 0.001); 0: off."""

    def __post_init__(self) -> None:
        _check_choice("disc_loss", self.disc_loss, DiscLoss)  # before the type check: a clearer message
        _check_choice("disc_norm", self.disc_norm, DiscriminatorNorm)
        super().__post_init__()
        if self.disc_start < 0 or self.disc_ramp_steps < 0:
            raise ValueError(f"disc_start and disc_ramp_steps must be >= 0, got {self.disc_start}, "
                             f"{self.disc_ramp_steps}")
        if self.disc_channels < 1:
            raise ValueError(f"disc_channels must be positive, got {self.disc_channels}")


@dataclass(frozen=True)
class OptimizationOptions(Checked):
    """Learning-rate schedule, clipping and accumulation (``--model.optimization.*``)."""

    warmup_steps: int = 1000
    """Batches of linear learning-rate warm-up from 0."""
    lr_schedule: LrSchedule = "cosine"
    """After warm-up: "cosine" decay to min_lr_ratio over the run, or "constant"."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of learning_rate."""
    grad_clip_norm: float | None = None
    """Clip the gradients' global norm to this (None: no clipping; fused Adam needs none)."""
    accumulate_grad_batches: int = 1
    """VQ-GAN's gradient accumulation (manual optimisation); for VQ-VAE use --trainer.accumulate_grad_batches."""
    ema_decay: float = 0.0
    """Decay of a weight EMA (e.g. 0.999, as Open-MAGVIT2): the averaged weights are validated and exported; 0: off."""

    def __post_init__(self) -> None:
        _check_choice("lr_schedule", self.lr_schedule, LrSchedule)
        super().__post_init__()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no weight EMA), got {self.ema_decay}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class OptimizerConfig(OptimizationOptions):
    """Adam and its schedule."""

    learning_rate: float = 2e-4
    """Adam's learning rate (the autoencoder's; see disc_learning_rate)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam's betas."""
    weight_decay: float = 0.0
    """Adam's (L2) weight decay."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))


@dataclass(frozen=True)
class LoggingOptions(Checked):
    """What the logged code statistics cover (``--model.logging.*``)."""

    usage_window: int = 100
    """Training batches behind train/code_usage_rate and train/perplexity."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")


@dataclass(frozen=True)
class LoggingConfig(LoggingOptions):
    """Logging cadence, in training batches."""

    log_every_n_steps: int = 100
    """Scalars every N training batches."""
    log_images_every_n_steps: int = 500
    """train/reconstruction every N training batches."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_every_n_steps < 1 or self.log_images_every_n_steps < 1:
            raise ValueError("log_every_n_steps and log_images_every_n_steps must be >= 1")


@dataclass(frozen=True)
class SpeedOptions(Checked):
    """How fast it runs, never what it computes beyond rounding (``--model.speed.*``)."""

    channels_last: bool = True
    """NHWC memory format on CUDA: what cuDNN's bf16 tensor-core convolutions want."""
    compile: bool = False
    """torch.compile the networks (fuses GroupNorm + SiLU); the GPU presets turn it on."""
    fused_norm: bool = False
    """On CUDA, ResBlocks' GroupNorm + SiLU in Triton kernels (``animevq.kernels``). Off: on an
    H200 under compile it trained no faster than Inductor's fusion (BENCHMARKS.md)."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode: "default", or "max-autotune-no-cudagraphs" (times Triton kernel
    configurations and convolution choices at the first step: slower to start)."""

    def __post_init__(self) -> None:
        _check_choice("compile_mode", self.compile_mode, CompileMode)
        super().__post_init__()


@dataclass(frozen=True)
class SafetyOptions(Checked):
    """What protects a long run from bad batches (``--model.safety.*``)."""

    max_nonfinite_steps: int | None = 10
    """NaN/inf-loss batches in a row that are skipped before the run stops; None: no guard."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_nonfinite_steps is not None and self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 or None (no guard), got {self.max_nonfinite_steps}")


# VQVAEModel's groups: parameter name → options class.
GROUPS: dict[str, type] = {
    "quantizer": QuantizerOptions,
    "losses": LossOptions,
    "adversarial": AdversarialOptions,
    "optimization": OptimizationOptions,
    "logging": LoggingOptions,
    "speed": SpeedOptions,
    "safety": SafetyOptions,
}
# animevq 0.1 took every option flat (model.warmup_steps); 0.2 takes it in its group.
_IN_0_1 = {**GROUPS, "quantizer": VQOptions}  # 0.1's quantizer options were VQ-EMA's
MOVED_IN_0_2: dict[str, str] = {f.name: f"{group}.{f.name}" for group, kind in _IN_0_1.items() for f in fields(kind)}
# The seed's table, in its order, and the config class that holds each parameter's default.
_SEED_HOMES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (TokenizerConfig, ("in_channels", "latent_channels", "encoder_channels", "decoder_channels", "num_res_blocks")),
    (VQConfig, ("num_embeddings", "embedding_dim", "commitment_cost", "decay")),
    (LossConfig, ("lambda_rec", "lambda_vq", "lambda_commit", "lambda_perc", "lambda_gan", "use_lpips")),
    (OptimizerConfig, ("learning_rate", "betas", "weight_decay")),
    (LoggingConfig, ("log_every_n_steps", "log_images_every_n_steps")),
)
SEED_PARAMETERS: tuple[str, ...] = tuple(name for _, names in _SEED_HOMES for name in names)
SEED_DEFAULTS: dict[str, Any] = {  # the seed's parameter table, promised to users
    name: next(f.default for f in fields(home) if f.name == name) for home, names in _SEED_HOMES for name in names
}
# Hyperparameters that fix the shapes of the saved tensors: a checkpoint written with other
# values cannot be resumed.
ARCHITECTURE_KEYS: tuple[str, ...] = tuple(
    [f.name for f in fields(TokenizerConfig) if f.name != "quantizer"] + ["num_embeddings", "embedding_dim"]
)


@dataclass(frozen=True)
class ModelConfig(Checked):
    """Everything a VQVAEModel is built from."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    adversarial: AdversarialOptions = field(default_factory=AdversarialOptions)
    optimization: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    safety: SafetyOptions = field(default_factory=SafetyOptions)

    @property
    def adversarial_on(self) -> bool:
        """VQ-GAN (lambda_gan > 0) rather than VQ-VAE."""
        return self.losses.lambda_gan > 0

    @classmethod
    def build(cls, seed: Mapping[str, Any], groups: Mapping[str, Any]) -> ModelConfig:
        """From the seed's flat parameters and the groups (options dataclasses or mappings of
        their fields), as VQVAEModel receives them."""
        unknown = sorted(set(seed) - set(SEED_PARAMETERS)) + sorted(set(groups) - set(GROUPS))
        if unknown:
            raise TypeError(f"VQVAEModel has no parameter {', '.join(map(repr, unknown))}")
        given = groups.get("quantizer")
        if type(given) is VQOptions:  # 0.2's group: VQ-EMA's options
            groups = {**groups, "quantizer": {f.name: getattr(given, f.name) for f in fields(VQOptions)}}
        elif isinstance(given, Checked) and not isinstance(given, QuantizerOptions):  # e.g. a whole VQConfig
            elsewhere = sorted({f.name for f in fields(given)} - {f.name for f in fields(QuantizerOptions)})
            raise TypeError(f"model.quantizer takes a QuantizerOptions (or a mapping of its fields), not a "
                            f"{type(given).__name__}; {elsewhere} are set elsewhere")
        opts = {name: config_from_mapping(kind, groups.get(name, {}), what=f"model.{name}")
                for name, kind in GROUPS.items()}

        def part(home: type, names: tuple[str, ...], group: str) -> Any:
            values = {k: seed[k] for k in names if k in seed}
            return home(**values, **{f.name: getattr(opts[group], f.name) for f in fields(GROUPS[group])})

        homes = dict(_SEED_HOMES)
        quantizer = quantizer_from_flat({k: seed[k] for k in homes[VQConfig] if k in seed}, opts["quantizer"])
        arch = {k: seed[k] for k in homes[TokenizerConfig] if k in seed}
        return cls(
            tokenizer=TokenizerConfig(**arch, quantizer=quantizer),
            losses=part(LossConfig, homes[LossConfig], "losses"),
            adversarial=opts["adversarial"],
            optimization=part(OptimizerConfig, homes[OptimizerConfig], "optimization"),
            logging=part(LoggingConfig, homes[LoggingConfig], "logging"),
            speed=opts["speed"],
            safety=opts["safety"],
        )

    def replace_tokenizer(self, tokenizer: TokenizerConfig) -> ModelConfig:
        """This config with another tokenizer (an export's)."""
        return dataclasses.replace(self, tokenizer=tokenizer)

    def seed_values(self) -> dict[str, Any]:
        """The seed's twenty parameters, by name."""
        parts = {TokenizerConfig: self.tokenizer, LossConfig: self.losses, OptimizerConfig: self.optimization,
                 LoggingConfig: self.logging}
        quantizer, _ = flat_of_quantizer(self.tokenizer.quantizer)
        return {name: quantizer[name] if home is VQConfig else getattr(parts[home], name)
                for home, names in _SEED_HOMES for name in names}

    def group_values(self) -> dict[str, Any]:
        """Each group's options dataclass, by parameter name."""
        out = {}
        for name, kind in GROUPS.items():
            if name == "quantizer":
                out[name] = flat_of_quantizer(self.tokenizer.quantizer)[1]
            else:
                source = getattr(self, name)
                out[name] = kind(**{f.name: getattr(source, f.name) for f in fields(kind)})
        return out

    def to_hparams(self) -> dict[str, Any]:
        """VQVAEModel's constructor arguments as plain data (what checkpoints store)."""
        return {**plain(self.seed_values()), **{k: plain(v) for k, v in self.group_values().items()}}

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], *, fill: ModelConfig | None = None) -> ModelConfig:
        """From a checkpoint's hyperparameters: 0.2's seed parameters and groups, or 0.1's
        flat keys (each group's fields beside the seed's). Keys of neither (LightningCLI's
        ``_instantiator``) are ignored; keys it lacks take ``fill``'s values (default: the
        defaults), so an older file is compared only on what it recorded."""
        base = (fill or cls()).to_hparams()
        seed = {**{k: base[k] for k in SEED_PARAMETERS}, **{k: v for k, v in hparams.items() if k in SEED_PARAMETERS}}
        groups: dict[str, dict[str, Any]] = {}
        for name, kind in GROUPS.items():
            names = {f.name for f in fields(_IN_0_1[name])}
            flat = {k: v for k, v in hparams.items() if k in names}  # 0.1
            nested = hparams.get(name)
            recorded = {**flat, **(dict(nested) if isinstance(nested, Mapping) else {})}
            fallback = base[name]
            if name == "quantizer":  # a group without a family is VQ-EMA's; another family's options do not fill it
                recorded.setdefault("family", VQConfig.family)
                fallback = fallback if fallback["family"] == recorded["family"] else {}
            groups[name] = {**fallback, **recorded}
        return cls.build(seed, groups)

