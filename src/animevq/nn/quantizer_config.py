"""The quantizer families' typed configs: the one place their defaults live.

One frozen dataclass per family, each with a ``family`` name (what config.json stores), the
codebook size K (``codebook_size``) and the code dimension D (``embedding_dim``):

- :class:`VQConfig`: VQ-EMA, K learned codes of dimension D (van den Oord et al. 2017);
- :class:`FSQConfig`: finite scalar quantisation, K = Π levels, D = len(levels) (Mentzer et al. 2023);
- :class:`LFQConfig`: lookup-free quantisation, K = 2^D (MAGVIT-v2, Yu et al. 2023);
- :class:`SimVQConfig`: a frozen random codebook times a learned linear map (Zhu et al. 2024);
- :class:`IBQConfig`: index backpropagation, every code gets gradient (Shi et al. 2024).

``VQVAEModel`` takes the seed's four quantizer parameters flat (``num_embeddings``,
``embedding_dim``, ``commitment_cost``, ``decay``) and the rest as one group,
:class:`QuantizerOptions`, whose ``family`` picks the family. :func:`quantizer_from_flat`
turns the two into a family's config, and :func:`flat_of_quantizer` back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Union, get_args

from .checked import Checked

__all__ = [
    "FLAT_QUANTIZER_PARAMETERS",
    "MAX_CODEBOOK_SIZE",
    "QUANTIZER_CONFIGS",
    "FSQConfig",
    "IBQConfig",
    "LFQConfig",
    "QuantizerConfig",
    "QuantizerFamily",
    "QuantizerOptions",
    "RestartSampling",
    "SimVQConfig",
    "VQConfig",
    "VQOptions",
    "flat_of_quantizer",
    "quantizer_from_flat",
]

RestartSampling = Literal["error", "uniform"]
QuantizerFamily = Literal["vq", "fsq", "lfq", "simvq", "ibq"]
# Bounds checked before anything is allocated (K ≤ 2^18 in the literature).
MAX_CODEBOOK_SIZE = 2**24
# The seed's quantizer parameters, which VQVAEModel takes flat (their defaults: VQConfig's).
FLAT_QUANTIZER_PARAMETERS = ("num_embeddings", "embedding_dim", "commitment_cost", "decay")


def _check_size(name: str, k: int, d: int, words: str = "num_embeddings must lie in [1, {max}] and embedding_dim "
                "be positive") -> None:
    if not (1 <= k <= MAX_CODEBOOK_SIZE) or d < 1:
        raise ValueError(f"{name}: {words.format(max=MAX_CODEBOOK_SIZE)}, got {k} codes of dimension {d}")


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
        _check_size("vq", self.num_embeddings, self.embedding_dim)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    def stored_values(self) -> int:
        """Tensor values the family stores: the codebook and its EMA sums and counts."""
        return (2 * self.embedding_dim + 1) * self.num_embeddings


@dataclass(frozen=True)
class FSQConfig(Checked):
    """Finite scalar quantisation (Mentzer et al. 2023): each of D channels is bounded and
    rounded to one of ``levels[i]`` values; no codebook, no auxiliary loss."""

    family: ClassVar[str] = "fsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)
    """Values per channel (each ≥ 2): K = Π levels codes of dimension len(levels). The paper's
    presets: [8,5,5,5] (1,000 codes), [8,8,8,5,5,5] (64,000), [8,8,8,6,5] (15,360)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        super().__post_init__()
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"fsq levels must be a non-empty list of integers >= 2, got {list(self.levels)}")
        _check_size("fsq", math.prod(self.levels) if len(self.levels) <= 64 else MAX_CODEBOOK_SIZE + 1,
                    len(self.levels), "the product of levels must be at most {max}")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def embedding_dim(self) -> int:
        return len(self.levels)

    def stored_values(self) -> int:
        return 0


@dataclass(frozen=True)
class LFQConfig(Checked):
    """Lookup-free quantisation (MAGVIT-v2, Yu et al. 2023): the code of a D-channel latent is
    the signs of its channels, K = 2^D, with an entropy loss that keeps every code in use."""

    family: ClassVar[str] = "lfq"
    embedding_dim: int = 10
    """Code dimension D, the number of bits: K = 2^D codes (the seed's num_embeddings must be 2^D)."""
    commitment_cost: float = 0.25
    """β of the commitment term in the quantizer's own loss; VQVAEModel uses ``lambda_commit``."""
    entropy_weight: float = 0.1
    """Weight of the entropy loss in the training objective (MAGVIT-v2 and Open-MAGVIT2: 0.1)."""
    sample_entropy_weight: float = 1.0
    """Weight of the per-sample entropy E[H(q(c|z))], which is minimised (confident codes)."""
    codebook_entropy_weight: float = 1.0
    """Weight of the codebook entropy H(E[q(c|z)]), which is maximised (every code in use)."""
    entropy_temperature: float = 0.01
    """τ of the soft assignment q(c|z) ∝ exp(2⟨z, c⟩/τ) behind the entropy terms."""
    entropy_group_bits: int = 10
    """The codebook entropy is exact over groups of at most this many bits and summed over the
    groups (an upper bound of the joint entropy); 2^bits soft assignments per vector and group."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_size("lfq", 2 ** min(max(self.embedding_dim, 0), 64), self.embedding_dim,
                    "embedding_dim (bits) must lie in [1, 24]")
        if self.entropy_temperature <= 0 or not 1 <= self.entropy_group_bits <= 16:
            raise ValueError(f"lfq needs entropy_temperature > 0 and entropy_group_bits in [1, 16], got "
                             f"{self.entropy_temperature}, {self.entropy_group_bits}")

    @property
    def codebook_size(self) -> int:
        return 2**self.embedding_dim

    def stored_values(self) -> int:
        return 0


@dataclass(frozen=True)
class SimVQConfig(Checked):
    """SimVQ (Zhu et al. 2024): codes C·W, a frozen random codebook C (K×D) re-parameterised by a
    learned linear map W (D×D); the codebook loss trains W, so every code moves together."""

    family: ClassVar[str] = "simvq"
    num_embeddings: int = VQConfig.num_embeddings
    """Codebook size K."""
    embedding_dim: int = VQConfig.embedding_dim
    """Code dimension D."""
    commitment_cost: float = VQConfig.commitment_cost
    """β of the commitment term in the quantizer's own loss; VQVAEModel uses ``lambda_commit``."""
    seed: int = VQOptions.seed
    """Seed of the frozen codebook C (drawn once, then saved with the weights)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_size("simvq", self.num_embeddings, self.embedding_dim)

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    def stored_values(self) -> int:
        return self.num_embeddings * self.embedding_dim + self.embedding_dim * (self.embedding_dim + 1)


@dataclass(frozen=True)
class IBQConfig(Checked):
    """Index backpropagation quantisation (Shi et al. 2024): a softmax over the code logits
    ⟨z, c_k⟩ with a straight-through one-hot, so every code of the codebook receives gradient."""

    family: ClassVar[str] = "ibq"
    num_embeddings: int = VQConfig.num_embeddings
    """Codebook size K."""
    embedding_dim: int = VQConfig.embedding_dim
    """Code dimension D."""
    commitment_cost: float = VQConfig.commitment_cost
    """β of the commitment term in the quantizer's own loss; VQVAEModel uses ``lambda_commit``."""
    entropy_weight: float = 0.05
    """Weight of MAGVIT-v2's entropy loss over softmax(⟨z, c_k⟩/τ) in the training objective (the
    reference recipe's 0.05; 0 turns it off). Without it the inner-product argmax can collapse
    onto a few codes of large norm."""
    sample_entropy_weight: float = LFQConfig.sample_entropy_weight
    """Weight of the per-sample entropy, which is minimised."""
    codebook_entropy_weight: float = LFQConfig.codebook_entropy_weight
    """Weight of the codebook entropy of the batch mean, which is maximised."""
    entropy_temperature: float = LFQConfig.entropy_temperature
    """τ of that softmax."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_size("ibq", self.num_embeddings, self.embedding_dim)
        if self.entropy_temperature <= 0 or self.entropy_weight < 0:
            raise ValueError(f"ibq needs entropy_temperature > 0 and entropy_weight >= 0, got "
                             f"{self.entropy_temperature}, {self.entropy_weight}")

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    def stored_values(self) -> int:
        return self.num_embeddings * self.embedding_dim


QuantizerConfig = Union[VQConfig, FSQConfig, LFQConfig, SimVQConfig, IBQConfig]
# Families by the name stored in config.json ("family").
QUANTIZER_CONFIGS: dict[str, type] = {c.family: c for c in get_args(QuantizerConfig)}


@dataclass(frozen=True)
class QuantizerOptions(Checked):
    """The quantizer group of ``VQVAEModel`` (``--model.quantizer.*``): the family and its
    options beyond the seed's table. An option left at None takes its family's default; one
    set for a family that has no such option is refused."""

    family: QuantizerFamily = "vq"
    """The quantizer family: "vq" (VQ-EMA), "fsq", "lfq", "simvq" or "ibq" (see configs/quantizer/)."""
    restart_dead_codes: bool | None = None
    """vq: restart dead codes from the batch (default on)."""
    dead_code_threshold: float | None = None
    """vq: fraction of the mean EMA count under which a code is dead (default 0.125)."""
    restart_sampling: RestartSampling | None = None
    """vq: how restart vectors are drawn, "error" (default) or "uniform"."""
    kmeans_init: bool | None = None
    """vq: k-means initialisation of the codebook on the first batch (default off)."""
    kmeans_iters: int | None = None
    """vq: Lloyd iterations of that initialisation (default 10)."""
    l2_normalize_codes: bool | None = None
    """vq: cosine-similarity codes (default off)."""
    seed: int | None = None
    """vq, simvq: seed of the restart draws (vq) or of the frozen codebook (simvq) (default 0)."""
    levels: tuple[int, ...] | None = None
    """fsq: values per channel (default [8,5,5,5])."""
    entropy_weight: float | None = None
    """lfq, ibq: weight of the entropy loss (default 0.1 for lfq, 0.05 for ibq)."""
    sample_entropy_weight: float | None = None
    """lfq, ibq: weight of the per-sample entropy term (default 1.0)."""
    codebook_entropy_weight: float | None = None
    """lfq, ibq: weight of the codebook entropy term (default 1.0)."""
    entropy_temperature: float | None = None
    """lfq, ibq: temperature of the soft assignment (default 0.01)."""
    entropy_group_bits: int | None = None
    """lfq: bits per group of the codebook entropy (default 10)."""

    def __post_init__(self) -> None:
        if self.family not in QUANTIZER_CONFIGS:  # before the type check: a clearer message
            raise ValueError(f"quantizer family must be one of {', '.join(QUANTIZER_CONFIGS)}, got {self.family!r}")
        if isinstance(self.levels, list):
            object.__setattr__(self, "levels", tuple(self.levels))
        super().__post_init__()

    def set_options(self) -> dict[str, Any]:
        """The options given (not None), by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "family" and getattr(self, f.name) is not None}


_SEED_DEFAULTS = {name: getattr(VQConfig, name) for name in FLAT_QUANTIZER_PARAMETERS}


def _families_with(name: str) -> str:
    return ", ".join(f for f, c in QUANTIZER_CONFIGS.items() if name in {x.name for x in fields(c)})


def quantizer_from_flat(seed: Mapping[str, Any], options: QuantizerOptions) -> QuantizerConfig:
    """A family's config from the seed's flat quantizer parameters (missing ones take their
    defaults) and the group's options.

    For families whose K and D follow from other settings (fsq: ``levels``; lfq: D bits) the
    seed's ``num_embeddings`` and ``embedding_dim`` must agree with them; a seed parameter a
    family does not have (``decay`` outside vq, ``commitment_cost`` for fsq) must keep its
    default, and so must the options of other families.
    """
    cls = QUANTIZER_CONFIGS[options.family]
    own = {f.name for f in fields(cls)}
    flat = {**_SEED_DEFAULTS, **{k: v for k, v in seed.items() if k in FLAT_QUANTIZER_PARAMETERS}}
    foreign = [f"{name} (a setting of {_families_with(name)})" for name in options.set_options() if name not in own]
    foreign += [f"{name} {flat[name]!r} (a setting of {_families_with(name)})" for name in ("commitment_cost", "decay")
                if name not in own and flat[name] != _SEED_DEFAULTS[name]]
    if foreign:
        raise ValueError(f"the {options.family} quantizer has no {', '.join(foreign)}: remove it, or choose that "
                         "family with --model.quantizer.family")
    values = {k: v for k, v in flat.items() if k in own}
    values.update(options.set_options())
    config = cls(**values)
    if (config.codebook_size, config.embedding_dim) != (flat["num_embeddings"], flat["embedding_dim"]):
        raise ValueError(
            f"the {options.family} quantizer {_shape_words(config)} makes {config.codebook_size} codes of dimension "
            f"{config.embedding_dim}, but num_embeddings is {flat['num_embeddings']} and embedding_dim "
            f"{flat['embedding_dim']}: set --model.num_embeddings {config.codebook_size} --model.embedding_dim "
            f"{config.embedding_dim} (configs/quantizer/{options.family}.yaml does)")
    return config


def _shape_words(config: QuantizerConfig) -> str:
    if isinstance(config, FSQConfig):
        return f"with levels {list(config.levels)}"
    if isinstance(config, LFQConfig):
        return f"of {config.embedding_dim} bits"
    return f"with {config.codebook_size} codes"


def flat_of_quantizer(config: QuantizerConfig) -> tuple[dict[str, Any], QuantizerOptions]:
    """Undo :func:`quantizer_from_flat`: the seed's four parameters (the family's own values,
    K and D, and the defaults of those it lacks) and the group, with every option the family
    has written out."""
    seed = dict(_SEED_DEFAULTS, num_embeddings=config.codebook_size, embedding_dim=config.embedding_dim)
    seed.update({k: getattr(config, k) for k in ("commitment_cost", "decay") if hasattr(config, k)})
    group = {f.name for f in fields(QuantizerOptions)}
    options = {f.name: getattr(config, f.name) for f in fields(config) if f.name in group}
    return seed, QuantizerOptions(family=config.family, **options)
