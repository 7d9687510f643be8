"""Exported tokenizers: ``model.safetensors`` + ``config.json``, and a light ``Tokenizer``.

An export holds what turns images into codes and back — encoder, quant convs, quantizer
(codebook and its EMA statistics) and decoder — and nothing of training: no LPIPS, no
discriminator, no optimizer. safetensors files hold raw tensors only, so loading one can
never run code; ``config.json`` holds the model's hyperparameters as plain JSON.

    animevq export --ckpt runs/animevq/checkpoints/last.ckpt --out exported/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import TOKENIZER_PREFIXES, CheckpointError, check_state_dict, model_kwargs
from .nn.autoencoder import Decoder, Encoder
from .nn.quantizer import QuantizerOutput, VectorQuantizerEMA

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Tokenizer", "export_pretrained", "load_pretrained", "main"]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_TAG = "animevq.tokenizer/1"  # stored in the safetensors metadata


def _hparams_of(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, Tokenizer):
        return dict(model.config)
    return dict(model.hparams)


def _plain(value: Any) -> Any:
    """Hyperparameters as JSON values (tuples → lists); refuses anything else."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"hyperparameter value {value!r} of type {type(value).__name__} is not plain JSON")


def export_pretrained(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for a VQVAEModel or Tokenizer."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create export folder {out}: {error}; choose a writable --out") from error
    state = {
        k: v.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        for k, v in model.state_dict().items()
        if k.startswith(TOKENIZER_PREFIXES)
    }
    config = {k: _plain(v) for k, v in _hparams_of(model).items()}
    try:
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "animevq": FORMAT_TAG})
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as error:
        raise ValueError(f"cannot write the export to {out}: {error}; choose a writable --out") from error
    log.info("exported %d tensors to %s", len(state), out)
    return out


def read_pretrained(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, CPU state dict) of an export, with errors that name the missing file."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"exported model folder {folder} does not exist; create it with `animevq export`")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{folder} is not an exported model: {needed.name} is missing (see `animevq export`)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object of hyperparameters")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from error
    return config, state


def load_pretrained(directory: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any) -> Any:
    """A ``VQVAEModel`` (eval mode) from an export; ``overrides`` replace hyperparameters.

    LPIPS is off unless ``use_lpips=True`` is passed; a VQ-GAN's discriminator starts
    fresh (exports do not carry it).
    """
    from .lightning_module import VQVAEModel

    config, state = read_pretrained(directory)
    try:
        model = VQVAEModel(**model_kwargs(config, **overrides))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the config in {directory} does not build a VQVAEModel: {error}") from error
    check_state_dict(model, state, source=str(Path(directory) / WEIGHTS_NAME), optional=("lpips.", "discriminator."))
    model.load_state_dict(state, strict=False)
    return model.to(map_location).eval()


class Tokenizer(nn.Module):
    """Images ↔ codes with only the inference modules; no Lightning, no training state.

    ``encode``/``decode`` follow ``VQVAEModel``'s contract: (B,C,H,W) in [-1,1] ↔ (B,h·w)
    int64 codes (``decode`` also takes (B,h,w)).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        kw = self.config  # absent keys take VQVAEModel's defaults (the seed's table)
        latent, dim = kw.get("latent_channels", 256), kw.get("embedding_dim", 256)
        in_channels, blocks = kw.get("in_channels", 3), kw.get("num_res_blocks", 2)
        self.encoder = Encoder(in_channels, kw.get("encoder_channels", (128, 256, 256, 256)), blocks, latent)
        self.decoder = Decoder(in_channels, kw.get("decoder_channels", (256, 256, 256, 128)), blocks, latent)
        project = latent != dim  # VQVAEModel projects into code space only when widths differ
        self.quant_conv = nn.Conv2d(latent, dim, 1) if project else nn.Identity()
        self.post_quant_conv = nn.Conv2d(dim, latent, 1) if project else nn.Identity()
        self.quantizer = VectorQuantizerEMA(
            kw.get("num_embeddings", 1024),
            dim,
            kw.get("commitment_cost", 0.25),
            kw.get("decay", 0.99),
            restart_dead_codes=kw.get("restart_dead_codes", True),
            dead_code_threshold=kw.get("dead_code_threshold", 0.125),
            restart_sampling=kw.get("restart_sampling", "error"),
            kmeans_init=kw.get("kmeans_init", False),
            l2_normalize=kw.get("l2_normalize_codes", False),
        )
        self.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu") -> Tokenizer:
        """Load an export written by :func:`export_pretrained`."""
        config, state = read_pretrained(directory)
        tokenizer = cls(config)
        check_state_dict(tokenizer, state, source=str(Path(directory) / WEIGHTS_NAME))
        tokenizer.load_state_dict(state)
        return tokenizer.to(map_location).eval()

    @classmethod
    def from_model(cls, model: nn.Module) -> Tokenizer:
        """A Tokenizer holding a copy of a VQVAEModel's inference weights."""
        tokenizer = cls(dict(model.hparams))
        state = {k: v for k, v in model.state_dict().items() if k.startswith(TOKENIZER_PREFIXES)}
        tokenizer.load_state_dict(state)
        return tokenizer.to(model.quantizer.codebook.device).eval()

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def quantize(self, x: torch.Tensor) -> QuantizerOutput:
        """(B,C,H,W) → quantiser output on the (B,D,h,w) latents."""
        return self.quantizer(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) in [-1,1] → code indices (B,h·w) int64 in [0,K)."""
        return self.quantizer.quantize_indices(self.quant_conv(self.encoder(x))).flatten(1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B,h·w) (square grid) or (B,h,w) → images (B,C,16h,16w) in [-1,1]."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(f"flat indices of length {indices.shape[1]} are not a square grid; pass (B,h,w)")
            indices = indices.view(indices.shape[0], side, side)
        elif indices.dim() != 3:
            raise ValueError(f"indices must be (B,h·w) or (B,h,w), got shape {tuple(indices.shape)}")
        z_q = self.quantizer.lookup(indices.to(self.quantizer.codebook.device))  # (B,D,h,w)
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B,C,H,W) of images in [-1,1]."""
        return self.decoder(self.post_quant_conv(self.quantize(x).z_q))


def main(argv: Sequence[str]) -> int:
    """``animevq export --ckpt C --out DIR``."""
    from .checkpoint import load_model

    parser = argparse.ArgumentParser(
        prog="animevq export",
        description="Export a trained checkpoint to model.safetensors + config.json "
        "(encoder, decoder, codebook; no LPIPS, discriminator or optimizer state).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt written by `animevq fit`")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    args = parser.parse_args(list(argv)[1:])
    try:
        out = export_pretrained(load_model(args.ckpt), args.out)
    except ValueError as error:
        print(f"animevq export: error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} to {out}/{WEIGHTS_NAME} and {out}/{CONFIG_NAME}")
    return 0
