"""``animevq export --ckpt C --out DIR``: a trained tokenizer as ``model.safetensors`` +
``config.json`` (:meth:`animevq.nn.Tokenizer.save_pretrained`).

An export holds what turns images into codes and back (encoder, quant convs, quantizer with
its codebook and EMA statistics, decoder) and nothing of training: no LPIPS, no
discriminator, no optimiser. It loads with ``Tokenizer.from_pretrained(DIR)`` (or
``VQVAEModel.from_pretrained(DIR)`` to train on), and never runs code while loading.

    animevq export --ckpt runs/animevq/checkpoints/last.ckpt --out exported/

``--onnx`` also writes ``encoder.onnx`` (images → codes) and ``decoder.onnx`` (codes → images)
for ``--image_size`` images, with a dynamic batch size (:mod:`animevq.tools.onnx_export`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..nn.tokenizer import CONFIG_NAME, WEIGHTS_NAME
from ..runs.checkpoint_io import load_tokenizer
from . import onnx_export
from .common import IMAGE_SIZE, run_tool

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """``animevq export --ckpt C --out DIR``; argv[0] is the command."""
    parser = argparse.ArgumentParser(
        prog="animevq export",
        description="Export a trained checkpoint to model.safetensors + config.json "
        "(encoder, decoder, codebook; no LPIPS, discriminator or optimizer state).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt written by `animevq fit` (or an export)")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    parser.add_argument("--onnx", action="store_true",
                        help="also write encoder.onnx (images -> codes) and decoder.onnx (codes -> images), "
                        'batch size dynamic; needs pip install "animevq[onnx]"')
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE,
                        help="with --onnx: the side of the square images the graphs take (the training size)")
    args = parser.parse_args(list(argv)[1:])

    def work() -> str:
        tokenizer = load_tokenizer(args.ckpt)
        if args.onnx:  # before anything is written: missing packages or a bad size leave no files
            onnx_export.require_onnx()
            tokenizer.grid_size(args.image_size)
        out = tokenizer.save_pretrained(args.out)
        summary = f"exported {args.ckpt} to {out}/{WEIGHTS_NAME} and {out}/{CONFIG_NAME}"
        if args.onnx:
            graphs = onnx_export.export_onnx(tokenizer, out, image_size=args.image_size)
            summary += (f", and {graphs.encoder} and {graphs.decoder} ({args.image_size}x{args.image_size} images, "
                        f"opset {onnx_export.OPSET})")
        return summary

    return run_tool("export", work, out=args.out)
