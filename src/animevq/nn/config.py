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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

__all__ = ["RestartSampling", "TokenizerConfig", "VQConfig", "VQOptions", "config_from_mapping", "plain"]

RestartSampling = Literal["error", "uniform"]


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
class VQOptions:
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
        if self.restart_sampling not in get_args(RestartSampling):
            raise ValueError(f"restart_sampling must be one of {get_args(RestartSampling)}, "
                             f"got {self.restart_sampling!r}")
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
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be positive, "
                             f"got {self.num_embeddings}, {self.embedding_dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


# Quantizer families by the name stored in config.json ("family").
QUANTIZER_CONFIGS: dict[str, type] = {VQConfig.family: VQConfig}


@dataclass(frozen=True)
class TokenizerConfig:
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
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError(f"encoder_channels {self.encoder_channels} and decoder_channels "
                             f"{self.decoder_channels} must have the same number of stages")
        if not self.encoder_channels or min(self.encoder_channels + self.decoder_channels) < 1:
            raise ValueError("encoder_channels and decoder_channels must be non-empty and positive")
        if min(self.in_channels, self.latent_channels) < 1 or self.num_res_blocks < 0:
            raise ValueError("in_channels and latent_channels must be positive, num_res_blocks >= 0")

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
