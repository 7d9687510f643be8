"""``animevq export --ckpt C --out DIR``: a trained tokenizer as ``model.safetensors`` +
``config.json`` (:meth:`animevq.nn.Tokenizer.save_pretrained`).

An export holds what turns images into codes and back (encoder, quant convs, quantizer with
its codebook and EMA statistics, decoder) and nothing of training: no LPIPS, no
discriminator, no optimiser. It loads with ``Tokenizer.from_pretrained(DIR)`` (or
``VQVAEModel.from_pretrained(DIR)`` to train on), and never runs code while loading.

    animevq export --ckpt runs/animevq/checkpoints/last.ckpt --out exported/
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..nn.tokenizer import CONFIG_NAME, WEIGHTS_NAME
from ..runs.checkpoint_io import load_tokenizer
from .common import run_tool

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
    args = parser.parse_args(list(argv)[1:])

    def work() -> str:
        out = load_tokenizer(args.ckpt).save_pretrained(args.out)
        return f"exported {args.ckpt} to {out}/{WEIGHTS_NAME} and {out}/{CONFIG_NAME}"

    return run_tool("export", work, out=args.out)
