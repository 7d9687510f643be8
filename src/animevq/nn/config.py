"""The tokenizer's typed configuration: the one place its defaults live.

A :class:`TokenizerConfig` builds a :class:`~animevq.nn.Tokenizer`; its ``quantizer`` field
holds the quantizer family's own config (today :class:`VQConfig`, VQ-EMA). Each family's
config splits in two: the fields of the seed's parameter table (``num_embeddings``,
``embedding_dim``, ``commitment_cost``, ``decay``), which ``VQVAEModel`` takes flat, and the
options beyond it (:class:`VQOptions`), which it takes as one group.

Plain dataclasses and the standard library only: ``config.json`` of an export is
``TokenizerConfig.to_dict()`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args, get_origin

__all__ = ["Checked", "RestartSampling", "TokenizerConfig", "VQConfig", "VQOptions", "config_from_mapping", "plain"]

RestartSampling = Literal["error", "uniform"]
# Bounds checked before anything is allocated: a tampered config.json or checkpoint must not ask
# for gigabytes. Far above any tokenizer in use (the seed's holds 2.4e7 values, K ≤ 2^18 in the
# literature).
MAX_PARAMETERS = 2**31  # 8 GiB of float32 weights and codebook statistics
MAX_CODEBOOK_SIZE = 2**24
MAX_STAGES = 8


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (JSON's lists standing for tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if hint is type(None):
        return "None"
    name = f"finite {hint.__name__}" if hint is float else hint.__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class Checked:
    """Base of the config dataclasses: before a subclass's own checks, every field must be of
    its annotated type (configs arrive from JSON, YAML and checkpoints, not only from code)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not _conforms(value, hints[f.name]):
                raise TypeError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r:.60}")


def plain(value: Any) -> Any:
    """A config value as JSON/YAML data: tuples become lists, dataclasses dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not plain data")


def config_from_mapping(cls: type, values: Mapping[str, Any], *, what: str) -> Any:
    """``cls(**values)`` for a config dataclass, refusing keys it does not have (naming them
    and ``what`` the values came from) and turning lists back into tuples."""
    if type(values) is cls:
        return values
    if isinstance(values, cls):  # e.g. a whole VQConfig where VQOptions is asked: its other fields would be lost
        raise TypeError(f"{what} takes a {cls.__name__} (or a mapping of its fields), not a {type(values).__name__}; "
                        f"{sorted({f.name for f in fields(values)} - {f.name for f in fields(cls)})} are set elsewhere")
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a {cls.__name__} or a mapping of its fields, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{what} has no setting {', '.join(map(repr, unknown))}; "
                         f"known settings: {', '.join(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class VQOptions(Checked):
    """VQ-EMA codebook health, beyond the seed's table (``--model.quantizer.*``)."""

    restart_dead_codes: bool = True
    """Replace codes whose EMA count falls under ``dead_code_threshold`` × the mean count by
    encoder vectors of the current (global) batch (Jukebox, Dhariwal et al. 2020)."""
    dead_code_threshold: float = 0.125
    """Fraction of the mean EMA count under which a code counts as dead (a code used 8×
    less than average)."""
    restart_sampling: RestartSampling = "error"
    """How restart vectors are drawn from the batch: "error", with probability ∝ their
    squared distance to their code (k-means++'s D² rule), or "uniform"."""
    kmeans_init: bool = False
    """Initialise the codebook by k-means on the first training batch (global under DDP)."""
    kmeans_iters: int = 10
    """Lloyd iterations of that k-means initialisation."""
    l2_normalize_codes: bool = False
    """Compare unit vectors, i.e. cosine similarity (ViT-VQGAN, Yu et al. 2022): steadier
    usage for large codebooks, at the cost of the vectors' norms."""
    seed: int = 0
    """Base seed of the restart draws and k-means++ seeds, the same on every rank."""

    def __post_init__(self) -> None:
        if self.restart_sampling not in get_args(RestartSampling):  # before the type check: a clearer message
            raise ValueError(f"restart_sampling must be one of {get_args(RestartSampling)}, "
                             f"got {self.restart_sampling!r}")
        super().__post_init__()
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")


@dataclass(frozen=True)
class VQConfig(VQOptions):
    """The VQ-EMA quantizer (van den Oord et al. 2017): K learned codes of dimension D."""

    family: ClassVar[str] = "vq"
    num_embeddings: int = 1024
    """Codebook size K."""
    embedding_dim: int = 256
    """Code dimension D; 1×1 convs project when it differs from ``latent_channels``."""
    commitment_cost: float = 0.25
    """β of the quantizer's own loss when used on its own (VQ-VAE paper); VQVAEModel weights
    the commitment term by ``lambda_commit`` instead."""
    decay: float = 0.99
    """EMA decay γ of the codebook (VQ-VAE paper); 0 trains the codebook by gradient."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (1 <= self.num_embeddings <= MAX_CODEBOOK_SIZE) or self.embedding_dim < 1:
            raise ValueError(f"num_embeddings must lie in [1, {MAX_CODEBOOK_SIZE}] and embedding_dim be positive, "
                             f"got {self.num_embeddings}, {self.embedding_dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


# Quantizer families by the name stored in config.json ("family").
QUANTIZER_CONFIGS: dict[str, type] = {VQConfig.family: VQConfig}


@dataclass(frozen=True)
class TokenizerConfig(Checked):
    """Everything that builds a Tokenizer (SPEC §2): the autoencoder's shape and its quantizer."""

    in_channels: int = 3
    """Image channels."""
    latent_channels: int = 256
    """Channels of the encoder's output and the decoder's input."""
    encoder_channels: tuple[int, ...] = (128, 256, 256, 256)
    """Width of each encoder stage; every stage halves the image side."""
    decoder_channels: tuple[int, ...] = (256, 256, 256, 128)
    """Width of each decoder stage; every stage doubles the side."""
    num_res_blocks: int = 2
    """ResBlocks per stage."""
    quantizer: VQConfig = field(default_factory=VQConfig)
    """The quantizer family's config."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "encoder_channels", tuple(self.encoder_channels))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError(f"encoder_channels {self.encoder_channels} and decoder_channels "
                             f"{self.decoder_channels} must have the same number of stages")
        if not self.encoder_channels or min(self.encoder_channels + self.decoder_channels) < 1:
            raise ValueError("encoder_channels and decoder_channels must be non-empty and positive")
        if min(self.in_channels, self.latent_channels) < 1 or self.num_res_blocks < 0:
            raise ValueError("in_channels and latent_channels must be positive, num_res_blocks >= 0")
        if len(self.encoder_channels) > MAX_STAGES:
            raise ValueError(f"at most {MAX_STAGES} stages, got {len(self.encoder_channels)}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ValueError(f"this tokenizer would hold about {self.parameter_count():.3g} weights and codebook "
                             f"values, more than the {MAX_PARAMETERS:.3g} animevq builds")

    def parameter_count(self) -> int:
        """About how many weights and codebook values the tokenizer holds (convolutions and the
        VQ codebook with its EMA sums; biases and norms aside), known before building it."""
        enc, dec, latent, blocks = self.encoder_channels, self.decoder_channels, self.latent_channels, self.num_res_blocks
        total = 9 * self.in_channels * enc[0] + 9 * enc[-1] * latent + 9 * latent * dec[0]
        for prev, c in zip((enc[0], *enc), enc):
            total += 16 * prev * c + blocks * 18 * c * c  # stride-2 4×4 conv, two 3×3 convs per ResBlock
        for w, out in zip(dec, dec[1:] + dec[-1:]):
            total += blocks * 18 * w * w + 9 * w * out  # ResBlocks, then the upsampling conv
        total += 9 * dec[-1] * 64 + 9 * 64 * self.in_channels  # the head
        q = self.quantizer
        if latent != q.embedding_dim:
            total += 2 * latent * q.embedding_dim
        return total + (2 * q.embedding_dim + 1) * q.num_embeddings

    @property
    def downsample_factor(self) -> int:
        """Image side / code grid side: 2 per stage."""
        return 2 ** len(self.encoder_channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (config.json); the quantizer's entry names its ``family``."""
        data = plain(self)
        data["quantizer"] = {"family": self.quantizer.family, **data["quantizer"]}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, what: str = "tokenizer config") -> TokenizerConfig:
        """Undo :meth:`to_dict`; unknown keys are refused with their names."""
        values = dict(data)
        quantizer = dict(values.pop("quantizer", {}))
        family = quantizer.pop("family", VQConfig.family)
        if family not in QUANTIZER_CONFIGS:
            raise ValueError(f"{what}: unknown quantizer family {family!r}; known: {', '.join(QUANTIZER_CONFIGS)}")
        values["quantizer"] = config_from_mapping(QUANTIZER_CONFIGS[family], quantizer, what=f"{what} (quantizer)")
        return config_from_mapping(cls, values, what=what)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> TokenizerConfig:
        """The tokenizer of a VQVAEModel's hyperparameters: the seed's flat names, the
        ``quantizer`` group (0.2) or its fields flat beside them (0.1); other keys ignored."""
        quantizer_cls = VQConfig
        names = {f.name for f in fields(quantizer_cls)}
        q = {k: v for k, v in hparams.items() if k in names}
        group = hparams.get("quantizer")
        if isinstance(group, Mapping):
            q.update({k: v for k, v in group.items() if k != "family"})
        elif dataclasses.is_dataclass(group):
            q.update({f.name: getattr(group, f.name) for f in fields(group)})
        top = {f.name for f in fields(cls)} - {"quantizer"}
        values = {k: v for k, v in hparams.items() if k in top}
        return cls.from_dict({**values, "quantizer": q}, what="model hyperparameters")
