"""The tokenizer's typed configuration: the one place its defaults live.

A :class:`TokenizerConfig` builds a :class:`~animevq.nn.Tokenizer`; its ``quantizer`` field
holds the quantizer family's own config (``animevq.nn.quantizer_config``: VQ-EMA, FSQ, LFQ,
SimVQ or IBQ). ``VQVAEModel`` takes the seed's quantizer parameters (``num_embeddings``,
``embedding_dim``, ``commitment_cost``, ``decay``) flat and the rest as one group
(:class:`QuantizerOptions`); :func:`quantizer_from_flat` joins them.

Plain dataclasses and the standard library only: ``config.json`` of an export is
``TokenizerConfig.to_dict()`` and nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .checked import Checked, config_from_mapping, plain
from .quantizer_config import (
    MAX_CODEBOOK_SIZE,
    QUANTIZER_CONFIGS,
    FSQConfig,
    IBQConfig,
    LFQConfig,
    QuantizerConfig,
    QuantizerOptions,
    RestartSampling,
    SimVQConfig,
    VQConfig,
    VQOptions,
    flat_of_quantizer,
    quantizer_from_flat,
)

__all__ = ["MAX_CODEBOOK_SIZE", "QUANTIZER_CONFIGS", "Checked", "FSQConfig", "IBQConfig", "LFQConfig",
           "QuantizerConfig", "QuantizerOptions", "RestartSampling", "SimVQConfig", "TokenizerConfig", "VQConfig",
           "VQOptions", "config_from_mapping", "flat_of_quantizer", "plain", "quantizer_from_flat"]

# Bounds checked before anything is allocated: a tampered config.json or checkpoint must not ask
# for gigabytes. Far above any tokenizer in use (the seed's holds 2.4e7 values).
MAX_PARAMETERS = 2**31  # 8 GiB of float32 weights and codebook statistics
MAX_STAGES = 8


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
    quantizer: QuantizerConfig = field(default_factory=VQConfig)
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
        quantizer's tensors; biases and norms aside), known before building it."""
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
        return total + q.stored_values()

    @property
    def downsample_factor(self) -> int:
        """Image side / code grid side: 2 per stage."""
        return 2 ** len(self.encoder_channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (config.json); the quantizer's entry names its ``family``, and
        ``codebook_size`` (K, derived: every index lies in [0, K)) is written beside it."""
        data = plain(self)
        data["quantizer"] = {"family": self.quantizer.family, **data["quantizer"]}
        data["codebook_size"] = self.quantizer.codebook_size
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, what: str = "tokenizer config") -> TokenizerConfig:
        """Undo :meth:`to_dict`; unknown keys are refused with their names, and a
        ``codebook_size`` that the quantizer does not make is refused too."""
        values = dict(data)
        quantizer = dict(values.pop("quantizer", {}))
        stated = values.pop("codebook_size", None)
        family = quantizer.pop("family", VQConfig.family)
        if family not in QUANTIZER_CONFIGS:
            raise ValueError(f"{what}: unknown quantizer family {family!r}; known: {', '.join(QUANTIZER_CONFIGS)}")
        values["quantizer"] = config_from_mapping(QUANTIZER_CONFIGS[family], quantizer, what=f"{what} (quantizer)")
        config = config_from_mapping(cls, values, what=what)
        if stated is not None and stated != config.quantizer.codebook_size:
            raise ValueError(f"{what}: codebook_size {stated!r} differs from the {config.quantizer.codebook_size} "
                             f"codes its {family} quantizer makes")
        return config

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> TokenizerConfig:
        """The tokenizer of a VQVAEModel's hyperparameters: the seed's flat names, the
        ``quantizer`` group (0.2; a group without ``family`` is VQ-EMA's) or VQ-EMA's options
        flat beside them (0.1); other keys ignored."""
        names = {f.name for f in fields(QuantizerOptions)}
        group = hparams.get("quantizer")
        if dataclasses.is_dataclass(group) and not isinstance(group, type):
            group = {f.name: getattr(group, f.name) for f in fields(group)}
        options = {k: v for k, v in hparams.items() if k in names and k != "family"}  # 0.1
        if isinstance(group, Mapping):
            options.update(group)
        try:
            quantizer = quantizer_from_flat(hparams, config_from_mapping(QuantizerOptions, options, what="quantizer"))
        except (TypeError, ValueError) as error:
            raise type(error)(f"model hyperparameters: {error}") from None
        top = {f.name for f in fields(cls)} - {"quantizer"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items() if k in top},
                   quantizer=quantizer)
