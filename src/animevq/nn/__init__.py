"""Pure-PyTorch building blocks of animevq (no Lightning, no SwanLab)."""

from .autoencoder import Decoder, Encoder
from .blocks import ResBlock
from .discriminator import PatchDiscriminator
from .lpips import LPIPS
from .quantizer import QuantizerOutput, VectorQuantizerEMA

__all__ = ["ResBlock", "Encoder", "Decoder", "VectorQuantizerEMA", "QuantizerOutput", "LPIPS", "PatchDiscriminator"]
