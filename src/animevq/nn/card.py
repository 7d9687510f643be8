"""The model card (``README.md``) written beside an exported tokenizer.

Hugging Face Hub conventions: YAML front matter (``library_name``, ``tags``) that the Hub
indexes, then Markdown. The card says what the weights were trained on (data folder, image
count, resolution), what the codebook is (family, K, D, grid), and how the tokenizer scored in
``animevq evaluate`` when that is known. Facts a checkpoint does not record read "unknown".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

from .config import TokenizerConfig

__all__ = ["LIBRARY_NAME", "TAGS", "model_card"]

LIBRARY_NAME = "animevq"
TAGS = ["animevq", "image-tokenizer", "vq-vae"]
UNKNOWN = "unknown"
# evaluate's report.json keys shown in the card, with their labels (higher or lower is better).
METRICS = {
    "psnr": "PSNR (dB, higher is better)",
    "ssim": "SSIM (higher is better)",
    "lpips": "LPIPS (lower is better)",
    "rfid": "rFID (lower is better)",
    "masked_psnr": "PSNR on the drawing of flat-background images (dB)",
    "perplexity": "code perplexity",
    "code_usage_rate": "share of the codebook used",
    "codes_used": "codes used",
}


def _shown(value: Any) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {label} | {_shown(value)} |" for label, value in rows])


def model_card(config: TokenizerConfig, *, weights_sha256: str, data_dir: str | None = None,
               num_images: int | None = None, num_train_images: int | None = None,
               image_size: int | None = None, metrics: Mapping[str, Any] | None = None) -> str:
    """The card's text for a tokenizer built from ``config``.

    Args:
        weights_sha256: :meth:`Tokenizer.weights_sha256`, so the card names the weights it describes.
        data_dir: the training data folder as the run recorded it.
        num_images: image files the run listed for training and validation (files that fail to
            decode are skipped later); ``num_train_images`` of them in training.
        image_size: side S of the square training crops.
        metrics: an ``animevq evaluate`` report.json of these weights.
    """
    q = config.quantizer
    factor = config.downsample_factor
    grid = f"{image_size // factor}×{image_size // factor} at {image_size}×{image_size}" if image_size else (
        f"H/{factor} × W/{factor}")
    count = num_images if num_train_images is None else f"{num_images} ({num_train_images} for training)"
    front = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS)).to_yaml()
    parts = [
        f"---\n{front}\n---\n",
        "# animevq image tokenizer\n",
        "Turns (B,3,H,W) images in [-1,1] into grids of code indices and back. Trained with animevq.\n",
        "## Training data\n",
        _table([("data folder", f"`{data_dir}`" if data_dir else None), ("image files", count),
                ("resolution", f"{image_size}×{image_size}" if image_size else None)]) + "\n",
        "## Codebook\n",
        _table([("quantizer", q.family), ("codebook size K", q.codebook_size), ("code dimension D", q.embedding_dim),
                ("downsampling", factor), ("code grid", grid)]) + "\n",
        "## Evaluation\n",
    ]
    if metrics:
        where = f"{metrics.get('num_images', UNKNOWN)} images of `{metrics.get('data_dir', UNKNOWN)}` at " \
                f"{metrics.get('image_size', UNKNOWN)} px"
        parts += [f"`animevq evaluate` on {where}:\n",
                  _table([(label, metrics.get(key)) for key, label in METRICS.items()]) + "\n"]
    else:
        parts.append("Not evaluated: run `animevq evaluate`, then `animevq export ... --metrics DIR/report.json`.\n")
    parts += [
        "## Use\n",
        "```python\nfrom animevq import Tokenizer\n\n"
        'tokenizer = Tokenizer.from_pretrained("this folder or its Hub repo id")\n'
        "codes = tokenizer.encode(images)  # (B,h·w) in [0,K)\nimages = tokenizer.decode(codes)\n```\n",
        f"Weights SHA-256: `{weights_sha256}`\n",
    ]
    return "\n".join(parts)
