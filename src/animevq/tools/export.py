"""``animevq export --ckpt C --out DIR [--metrics REPORT]``: a trained tokenizer as
``model.safetensors`` + ``config.json`` (:meth:`animevq.nn.Tokenizer.save_pretrained`) and a
model card, ``README.md``.

An export holds what turns images into codes and back (encoder, quant convs, quantizer with
its codebook and EMA statistics, decoder) and nothing of training: no LPIPS, no
discriminator, no optimiser. It loads with ``Tokenizer.from_pretrained(DIR)`` (or
``VQVAEModel.from_pretrained(DIR)`` to train on), and never runs code while loading;
``Tokenizer.push_to_hub(repo_id)`` publishes it.

``--onnx`` also writes ``encoder.onnx`` (images → codes) and ``decoder.onnx`` (codes → images)
for ``--image_size`` images, with a dynamic batch size (:mod:`animevq.tools.onnx_export`).

The card names the training data folder, its image count and the resolution, as the
checkpoint recorded them (checkpoints from before animevq recorded the count read
"unknown"), the codebook, and the metrics of ``--metrics``: the ``report.json`` that
``animevq evaluate`` wrote for these weights.

    animevq evaluate --ckpt runs/animevq/checkpoints/last.ckpt --data_dir held_out/ --out eval/
    animevq export --ckpt runs/animevq/checkpoints/last.ckpt --out exported/ --metrics eval/report.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.datamodule import AnimeDataModule
from ..nn.tokenizer import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, Tokenizer
from ..runs.checkpoint_io import DATAMODULE_HPARAMS, checkpoint_tokenizer, load_tokenizer, read_checkpoint
from . import onnx_export
from .common import IMAGE_SIZE, image_size_for, run_tool

__all__ = ["card_facts", "main"]

SAMPLE_DATA = "animevq's bundled sample images"  # what data_dir=None trains on


def card_facts(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The training facts a Lightning checkpoint records, as :func:`animevq.nn.card.model_card`'s
    keywords; what it does not record is left out (the card reads "unknown")."""
    facts: dict[str, Any] = {}
    data = checkpoint.get(DATAMODULE_HPARAMS)
    if isinstance(data, Mapping):
        facts["data_dir"] = SAMPLE_DATA if data.get("data_dir") is None else str(data["data_dir"])
        facts["image_size"] = data.get("image_size")
    counts = checkpoint.get(AnimeDataModule.__qualname__)  # AnimeDataModule.state_dict()
    if isinstance(counts, Mapping):
        facts["num_images"] = counts.get("num_images")
        facts["num_train_images"] = counts.get("num_train_images")
    return facts


def read_metrics(path: str | Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """An evaluate report.json of ``tokenizer``'s weights (a report of other weights is refused)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--metrics {path} is not a readable report.json ({error}); "
                         "pass the report.json `animevq evaluate` wrote") from error
    if not isinstance(report, dict) or "model_sha256" not in report:
        raise ValueError(f"--metrics {path} is not a report.json of `animevq evaluate` (no model_sha256)")
    if report["model_sha256"] != tokenizer.weights_sha256():
        raise ValueError(f"--metrics {path} scored other weights than {CARD_NAME} would describe; "
                         "run `animevq evaluate` on this checkpoint and pass its report.json")
    return report


def main(argv: Sequence[str]) -> int:
    """``animevq export --ckpt C --out DIR [--metrics REPORT]``; argv[0] is the command."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="animevq export",
        description="Export a trained checkpoint to model.safetensors + config.json "
        "(encoder, decoder, codebook; no LPIPS, discriminator or optimizer state) and a model card README.md.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt written by `animevq fit` (or an export)")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors, config.json, README.md into")
    parser.add_argument("--metrics", default=None,
                        help="report.json of `animevq evaluate` on these weights, shown in README.md")
    parser.add_argument("--onnx", action="store_true",
                        help="also write encoder.onnx (images -> codes) and decoder.onnx (codes -> images), "
                        'batch size dynamic; needs pip install "animevq[onnx]"')
    parser.add_argument("--image_size", type=int, default=None,
                        help="with --onnx: the side of the square images the graphs take; default: the size the "
                        f"checkpoint was trained at, else {IMAGE_SIZE}")
    args = parser.parse_args(list(argv)[1:])

    def work() -> str:
        path = Path(args.ckpt)
        if path.is_dir() or path.suffix == ".safetensors":  # an export: no training facts to show
            tokenizer, facts = load_tokenizer(path), {}
        else:
            checkpoint = read_checkpoint(path)
            tokenizer, facts = checkpoint_tokenizer(checkpoint, source=path), card_facts(checkpoint)
        if args.metrics is not None:
            facts["metrics"] = read_metrics(args.metrics, tokenizer)
        image_size = image_size_for(tokenizer, args.image_size)
        if args.onnx:  # before anything is written: missing packages or a bad size leave no files
            onnx_export.require_onnx()
            tokenizer.grid_size(image_size)
        out = tokenizer.save_pretrained(args.out, model_card_kwargs=facts)
        summary = f"exported {args.ckpt} to {out}/{WEIGHTS_NAME} and {out}/{CONFIG_NAME} (model card {out}/{CARD_NAME})"
        if args.onnx:
            graphs = onnx_export.export_onnx(tokenizer, out, image_size=image_size)
            summary += (f", and {graphs.encoder} and {graphs.decoder} ({image_size}x{image_size} images, "
                        f"opset {onnx_export.OPSET})")
        return summary

    return run_tool("export", work, out=args.out)
