"""Pure-PyTorch building blocks of animevq (no Lightning, no SwanLab)."""

from .autoencoder import Decoder, Encoder
from .blocks import ResBlock
from .config import TokenizerConfig, VQConfig, VQOptions
from .discriminator import PatchDiscriminator
from .lpips import LPIPS
from .quantizers import Quantizer, QuantizerOutput, QuantizerStats, VectorQuantizerEMA
from .tokenizer import Tokenizer, TokenizerOutput
from .weights import CheckpointError

__all__ = [
    "LPIPS",
    "CheckpointError",
    "Decoder",
    "Encoder",
    "PatchDiscriminator",
    "Quantizer",
    "QuantizerOutput",
    "QuantizerStats",
    "ResBlock",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQConfig",
    "VQOptions",
    "VectorQuantizerEMA",
]
