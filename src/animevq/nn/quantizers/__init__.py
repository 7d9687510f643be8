"""Quantizer families behind one interface (:class:`Quantizer`), one file each.

:func:`build_quantizer` turns a family's config (``TokenizerConfig.quantizer``) into its module.
"""

from __future__ import annotations

from ..quantizer_config import FSQConfig, IBQConfig, LFQConfig, SimVQConfig, VQConfig
from .base import (
    CodebookQuantizer,
    Quantizer,
    QuantizerOutput,
    QuantizerStats,
    TrainingSnapshot,
    code_counts,
    code_stats,
)
from .fsq import FiniteScalarQuantizer
from .ibq import IndexBackpropagationQuantizer
from .kmeans import lloyd, nearest_code
from .lfq import LookupFreeQuantizer
from .simvq import SimVQ
from .vq_ema import VectorQuantizerEMA

__all__ = [
    "QUANTIZERS",
    "CodebookQuantizer",
    "FiniteScalarQuantizer",
    "IndexBackpropagationQuantizer",
    "LookupFreeQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "QuantizerStats",
    "SimVQ",
    "TrainingSnapshot",
    "VectorQuantizerEMA",
    "build_quantizer",
    "code_counts",
    "code_stats",
    "lloyd",
    "nearest_code",
]

QUANTIZERS: dict[type, type[Quantizer]] = {  # config class → family
    VQConfig: VectorQuantizerEMA,
    FSQConfig: FiniteScalarQuantizer,
    LFQConfig: LookupFreeQuantizer,
    SimVQConfig: SimVQ,
    IBQConfig: IndexBackpropagationQuantizer,
}


def build_quantizer(config: object) -> Quantizer:
    """The quantizer module of a family's config."""
    try:
        family = QUANTIZERS[type(config)]
    except KeyError:
        raise TypeError(f"no quantizer family takes a {type(config).__name__}") from None
    return family.from_config(config)
