"""Evaluate a tokenizer on a folder of images (SPEC §7).

    animevq evaluate --ckpt C --data_dir D --out DIR [--fid_weights P | --no_fid]

Every image is resized (short side) and centre-cropped to ``image_size``, reconstructed,
and scored per image in [0,1]: PSNR, SSIM, LPIPS (when VGG16 weights are available),
PSNR on the foreground of flat-background images; over the whole set: rFID, code usage
and perplexity, also over the cells that show some drawing only (``CodeTally``). Writes
``report.json``, ``samples.png`` (originals above reconstructions) and ``code_usage.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.quantizers import code_counts, code_stats
from ..nn.tokenizer import Tokenizer, write_whole
from ..runs.checkpoint_io import load_tokenizer
from ..tracking.images import code_usage_plot, make_reconstruction_grid
from . import metrics
from .common import (
    IMAGE_SIZE,
    add_common_arguments,
    autocast,
    image_batches,
    image_size_for,
    list_inputs,
    prepare_out_dir,
    progress_bar,
    resolve_device,
    resolve_precision,
    run_tool,
    save_png,
)

__all__ = ["REPORT_NAME", "CodeTally", "evaluate", "main"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
EVALUATE_BATCH_SIZE = 16  # smaller than the other tools': LPIPS and Inception run beside the tokenizer
NUM_SAMPLES = 8  # columns of samples.png
# Below this many images the 2048×2048 feature covariance is rank-deficient and rFID is
# strongly biased upwards: numbers are comparable only between runs of equal size.
FID_RELIABLE_IMAGES = 2048


class CodeTally:
    """Code histograms of a whole set, split by what each code's cell shows.

    On white-page illustrations a third or more of the code grid can be blank page. The
    foreground figures count only cells that show some of the drawing
    (``metrics.background_cells``), so a perplexity that moves only because blank page
    spreads over more (or fewer) codes shows as such. Images without a flat background
    count as all foreground.
    """

    def __init__(self, num_embeddings: int) -> None:
        self.foreground = torch.zeros(num_embeddings, dtype=torch.float64)
        self.background = torch.zeros(num_embeddings, dtype=torch.float64)

    @property
    def all(self) -> torch.Tensor:
        """(K,) histogram of every cell."""
        return self.foreground + self.background

    def update(self, indices: torch.Tensor, images01: torch.Tensor,
               foreground: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add (B,h,w) codes of (B,C,H,W) images in [0,1] (``foreground``: their
        ``metrics.foreground_mask``, when the caller has it already)."""
        k = self.foreground.numel()
        grid = tuple(indices.shape[-2:])
        background = metrics.background_cells(images01, grid, foreground=foreground).to(indices.device)
        self.foreground += code_counts(indices[~background], k).double().cpu()
        self.background += code_counts(indices[background], k).double().cpu()

    def report(self) -> dict[str, Any]:
        """Usage and perplexity of all cells and of foreground cells; the background's share."""
        counts = self.all
        perplexity, usage = code_stats(counts)
        fg_perplexity, fg_usage = code_stats(self.foreground)
        cells = float(counts.sum())
        return {
            "perplexity": float(perplexity),
            "code_usage_rate": float(usage),
            "codes_used": int((counts > 0).sum()),
            "num_embeddings": int(counts.numel()),
            "foreground_perplexity": float(fg_perplexity),
            "foreground_code_usage_rate": float(fg_usage),
            "background_cell_fraction": float(self.background.sum()) / cells if cells else 0.0,
            "background_codes_used": int((self.background > 0).sum()),
        }


def _lpips_metric(vgg_weights: str | None, notes: list[str]) -> nn.Module | None:
    """LPIPS from ``vgg_weights`` (errors propagate: the user asked for it), else from
    torchvision's cache; None with a note when there are no weights."""
    from ..nn.lpips import LPIPS  # torchvision's VGG: only when LPIPS is computed

    if vgg_weights is not None:
        return LPIPS(vgg_weights=vgg_weights)
    try:
        return LPIPS(allow_download=False)
    except (RuntimeError, FileNotFoundError, ValueError) as error:
        log.info("LPIPS unavailable: %s", error)
        notes.append(
            "LPIPS skipped: torchvision's ImageNet VGG16 weights are not on this machine; pass "
            "--lpips_vgg_weights PATH (a torchvision VGG16 state dict) or put them in torchvision's cache"
        )
        return None


def _mean(values: list[torch.Tensor]) -> float | None:
    """Mean over images, ignoring NaN (images a metric does not apply to); None if none count."""
    if not values:
        return None
    v = torch.cat(values).double()
    v = v[~v.isnan()]
    return float(v.mean()) if v.numel() else None


@torch.no_grad()
def evaluate(
    tokenizer: Tokenizer,
    data_dir: str | Path,
    *,
    batch_size: int = EVALUATE_BATCH_SIZE,
    image_size: int = IMAGE_SIZE,
    device: str | torch.device = "cpu",
    fid_weights: str | Path | None = None,
    compute_fid: bool = True,
    out_dir: str | Path | None = None,
    max_images: int | None = None,
    lpips_vgg_weights: str | None = None,
    lpips_metric: nn.Module | None = None,
    fid_metric: metrics.ReconstructionFID | None = None,
    precision: str = "32",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``tokenizer`` on every image under ``data_dir``.

    ``lpips_metric``/``fid_metric`` replace the default LPIPS / rFID (tests pass random
    networks). Raises FIDWeightsMissing when rFID is wanted and no weights exist.
    Returns the report, also written to ``out_dir/report.json`` when ``out_dir`` is given.
    """
    tokenizer.grid_size(image_size)
    root, files = list_inputs(data_dir)
    if max_images is not None:
        files = files[:max_images]
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    notes: list[str] = []
    fid: metrics.ReconstructionFID | None = None
    if compute_fid:  # before any work: weights asked for and missing fail fast
        try:
            fid = fid_metric if fid_metric is not None else metrics.ReconstructionFID(fid_weights, device=device)
        except metrics.FIDWeightsMissing as error:
            if fid_weights is not None:
                raise
            log.info("rFID unavailable: %s", error)
            notes.append(f"rFID skipped: the FID Inception-v3 weights are not on this machine; pass --fid_weights PATH "
                         f"({metrics.FID_WEIGHTS_URL}) or put the file at {metrics.default_fid_weights()}")
    else:
        notes.append("rFID skipped (--no_fid)")
    tokenizer = tokenizer.to(device).eval()
    lpips = lpips_metric if lpips_metric is not None else _lpips_metric(lpips_vgg_weights, notes)
    if lpips is not None:
        lpips = lpips.to(device).eval()

    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": [], "masked_psnr": []}
    tally = CodeTally(tokenizer.codebook_size)
    skipped: list[dict[str, str]] = []
    samples: list[tuple[torch.Tensor, torch.Tensor]] = []
    with progress_bar(len(files), "evaluate", progress) as bar:
        for batch in image_batches(root, files, image_size=image_size, batch_size=batch_size,
                                   num_workers=num_workers, device=device):
            skipped += [{"file": files[p], "reason": r} for p, r in batch.skipped]
            bar.update(len(batch.positions) + len(batch.skipped))
            if not batch.positions:
                continue
            x = batch.images  # (b,3,S,S) in [-1,1]
            with autocast(device, precision):
                tokenized = tokenizer(x)  # eval mode: no codebook update
                x_rec = tokenized.reconstruction.float().clamp(-1, 1)
            x01, rec01 = (x + 1) / 2, (x_rec + 1) / 2
            page = metrics.foreground_mask(x01)  # once, for the code tally and the masked PSNR
            tally.update(tokenized.indices, x01, foreground=page)
            scores["psnr"].append(metrics.psnr(x01, rec01).cpu())
            scores["ssim"].append(metrics.ssim(x01, rec01).cpu())
            scores["masked_psnr"].append(metrics.masked_psnr(x01, rec01, foreground=page).cpu())
            if lpips is not None:
                scores["lpips"].append(lpips(x, x_rec).float().cpu())
            if fid is not None:
                fid.update(x01, rec01)
            if sum(s[0].shape[0] for s in samples) < NUM_SAMPLES:
                samples.append((x[:NUM_SAMPLES].cpu(), x_rec[:NUM_SAMPLES].cpu()))
    n = sum(t.shape[0] for t in scores["psnr"])
    if n == 0:
        reasons = Counter(s["reason"] for s in skipped)
        detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        raise ValueError(f"none of the {len(files)} image files under {root} could be decoded ({detail})")
    flat = int(sum((~t.isnan()).sum() for t in scores["masked_psnr"]))
    report: dict[str, Any] = {
        "data_dir": str(root),
        "model_sha256": tokenizer.weights_sha256(),
        "num_images": n,
        "image_size": image_size,
        "psnr": _mean(scores["psnr"]),
        "ssim": _mean(scores["ssim"]),
        "lpips": _mean(scores["lpips"]),
        "masked_psnr": _mean(scores["masked_psnr"]),
        "masked_psnr_images": flat,  # images with a flat background (masked PSNR defined)
        "rfid": None,
        **tally.report(),
        "skipped": skipped,
        "notes": notes,
    }
    if fid is not None:
        if n >= 2:
            report["rfid"] = fid.compute()
            if n < FID_RELIABLE_IMAGES:
                notes.append(f"rFID from {n} images (< {FID_RELIABLE_IMAGES}) is biased; compare only at equal size")
        else:
            notes.append("rFID skipped: needs at least 2 images")
    if out is not None:
        _write_outputs(out, report, samples, tally.all)
    return report


def _write_outputs(out: Path, report: dict[str, Any], samples: list[tuple[torch.Tensor, torch.Tensor]],
                   counts: torch.Tensor) -> None:
    x = torch.cat([s[0] for s in samples])[:NUM_SAMPLES]
    x_rec = torch.cat([s[1] for s in samples])[:NUM_SAMPLES]
    save_png(make_reconstruction_grid(x, x_rec, max_images=NUM_SAMPLES), out / "samples.png")
    save_png(code_usage_plot(counts), out / "code_usage.png")
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}
    write_whole(out / REPORT_NAME, (json.dumps(clean, indent=2) + "\n").encode())  # the report last: it vouches for the rest


def main(argv: Sequence[str]) -> int:
    """``animevq evaluate --ckpt C --data_dir D [--out DIR] ...``; argv[0] is the command."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="animevq evaluate",
        description="Reconstruct every image of a folder and report PSNR, SSIM, LPIPS, rFID, masked PSNR, "
        "code usage and perplexity (report.json, samples.png, code_usage.png).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or exported model folder")
    parser.add_argument("--data_dir", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", default="eval", help="folder for report.json, samples.png, code_usage.png")
    parser.add_argument("--max_images", type=int, default=None, help="evaluate only the first N files")
    parser.add_argument("--no_fid", action="store_true", help="skip rFID (no Inception weights needed)")
    parser.add_argument("--fid_weights", default=None,
                        help=f"local FID Inception-v3 weights ({metrics.FID_WEIGHTS_FILE} from torch-fidelity)")
    parser.add_argument("--lpips_vgg_weights", default=None, help="local torchvision VGG16 state dict for LPIPS")
    add_common_arguments(parser)
    parser.set_defaults(batch_size=EVALUATE_BATCH_SIZE, precision="32")  # full precision: metrics must not move with dtype
    args = parser.parse_args(list(argv[1:]))

    def work() -> str:
        device = resolve_device(args.device)
        tokenizer = load_tokenizer(args.ckpt)
        report = evaluate(
            tokenizer, args.data_dir, batch_size=args.batch_size, image_size=image_size_for(tokenizer, args.image_size),
            device=device, fid_weights=args.fid_weights, compute_fid=not args.no_fid, out_dir=args.out,
            max_images=args.max_images, lpips_vgg_weights=args.lpips_vgg_weights,
            precision=resolve_precision(args.precision, device), num_workers=args.num_workers,
            progress=not args.quiet,
        )
        shown = {k: v for k, v in report.items() if k not in ("skipped", "data_dir")}
        return json.dumps(shown, indent=2) + f"\nwrote {Path(args.out) / REPORT_NAME}, samples.png and code_usage.png"

    return run_tool("evaluate", work, out=args.out)
