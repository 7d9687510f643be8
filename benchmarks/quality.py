"""Training-quality runs on real images (GPU; not a test).

    python benchmarks/quality.py DATA_DIR --steps 2000 --out results/ --name restart-on
    python benchmarks/quality.py DATA_DIR --steps 2000 --no-restart --name restart-off
    python benchmarks/quality.py DATA_DIR --steps 5000 --gan --disc_start 2500 --name vqgan
    python benchmarks/quality.py DATA_DIR --set quantizer.dead_code_threshold=0.5 --name threshold-0.5

Trains ``VQVAEModel`` (the seed's defaults at 256×256, batch 32, bf16-mixed) with a CSV
logger and prints, at each validation, the validation reconstruction loss and the code usage
and perplexity over the whole validation set, and the windowed training usage. At the end,
the validation codes are split by what their cells show (``animevq.tools.evaluate.CodeTally``):
perplexity over cells with some drawing, and the share of flat-background cells.
LPIPS is off unless ``--lpips_vgg_weights`` is given (a random VGG is not perceptual).

``--kmeans_check`` then freezes the encoder and asks what an MSE-optimal codebook for its
latents looks like: Lloyd's k-means on the latents of ``--kmeans_images`` training images,
started from the trained codebook and from k-means++ seeds, each scored on the validation
latents (quantisation error, usage, perplexity) beside the trained codebook.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from animevq.data import AnimeDataModule  # noqa: E402
from animevq.nn.quantizers import lloyd, nearest_code  # noqa: E402
from animevq.tools.evaluate import CodeTally  # noqa: E402
from animevq.train.module import VQVAEModel  # noqa: E402


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of the grey image: a standard focus/sharpness measure."""
    grey = x.float().mean(1, keepdim=True)
    kernel = LAPLACIAN.to(x.device).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, kernel).var(dim=(1, 2, 3)).mean()


class Sharpness(pl.Callback):
    """After each validation: sharpness of reconstructions relative to their originals (1 = as sharp)."""

    def __init__(self) -> None:
        self.batch: torch.Tensor | None = None
        self.rows: list[tuple[int, float]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.batch is None and batch_idx == 0:
            self.batch = batch[:16].detach().clone()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.batch is None or trainer.sanity_checking:
            return
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.batch.is_cuda):
            x_rec = pl_module(self.batch).reconstruction
        ratio = float(laplacian_variance(x_rec) / laplacian_variance(self.batch))
        self.rows.append((pl_module.batches_seen, ratio))


@torch.no_grad()
def lookup_latents(model: VQVAEModel, loader, device: torch.device, limit: int | None = None):
    """[(B,h,w,D) float32 latents as the quantiser compares them, (B,C,H,W) images in [0,1])] of
    the loader's batches, up to ``limit`` images."""
    out, seen = [], 0
    tokenizer = model.to(device).eval().tokenizer
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for batch in loader:
            x = VQVAEModel.images_of(batch).to(device)
            z_e = tokenizer.quant_conv(tokenizer.encoder(x))
            out.append((tokenizer.quantizer._prepare(z_e), (x.float() + 1) / 2))
            seen += x.shape[0]
            if limit is not None and seen >= limit:
                break
    return out


@torch.no_grad()
def score_codebook(codes: torch.Tensor, val: list) -> dict[str, float]:
    """Mean squared quantisation error per vector and ``CodeTally``'s report over validation latents."""
    tally = CodeTally(codes.shape[0])
    error, count = 0.0, 0
    for z, x01 in val:
        flat = z.reshape(-1, z.shape[-1])
        indices = nearest_code(flat, codes)
        error += float((flat - codes[indices]).pow(2).sum())
        count += flat.shape[0]
        tally.update(indices.view(z.shape[:-1]), x01)
    return {"quantisation_error": error / count, **tally.report()}


def kmeans_check(model: VQVAEModel, data: AnimeDataModule, val: list, device: torch.device, images: int,
                 iters: int) -> dict[str, dict[str, float]]:
    """The trained codebook against Lloyd's k-means codebooks for the same frozen encoder,
    scored on ``val`` (``lookup_latents`` of the validation set)."""
    train = torch.cat([z.reshape(-1, z.shape[-1]) for z, _ in
                       lookup_latents(model, data.train_dataloader(), device, images)])
    quantizer = model.tokenizer.quantizer
    trained = quantizer.embedding.detach().float().clone()
    torch.manual_seed(0)
    pool = train[torch.randperm(train.shape[0], device=train.device)[: 64 * quantizer.num_embeddings]]
    seeds = quantizer._kmeans_pp_seeds(pool)
    unit = quantizer.l2_normalize
    results = {
        "trained codebook": trained,
        f"k-means from it ({iters} iterations)": lloyd(train, trained, iters, l2_normalize=unit),
        f"k-means from k-means++ seeds ({iters} iterations)": lloyd(train, seeds, iters, l2_normalize=unit),
    }
    print(f"\nk-means check: {train.shape[0]:,} training vectors of {images} images, "
          f"{sum(z[..., 0].numel() for z, _ in val):,} validation vectors")
    scores = {}
    for name, codes in results.items():
        scores[name] = score_codebook(codes, val)
        r = scores[name]
        print(f"{name:>44}: error {r['quantisation_error']:.4g}, usage {r['code_usage_rate']:.3f}, "
              f"perplexity {r['perplexity']:.1f}, foreground perplexity {r['foreground_perplexity']:.1f}, "
              f"background codes {r['background_codes_used']}")
    return scores


def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--steps", type=int, default=2000, help="training batches")
    p.add_argument("--name", default="run")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--gan", action="store_true")
    p.add_argument("--disc_start", type=int, default=2500)
    p.add_argument("--disc_ramp_steps", type=int, default=500)
    p.add_argument("--lambda_gan", type=float, default=0.1)
    p.add_argument("--val_every", type=int, default=250)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--lpips_vgg_weights", default=None)
    p.add_argument("--accelerator", default="gpu", help="cpu for a smoke run")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--seed", type=int, default=0, help="initial weights (the split and batch order stay fixed)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other VQVAEModel argument (GROUP.NAME for a group's), a Python literal (repeatable)")
    p.add_argument("--kmeans_check", action="store_true",
                   help="score k-means codebooks for the trained encoder's latents beside the trained one")
    p.add_argument("--kmeans_images", type=int, default=3200, help="training images for --kmeans_check")
    p.add_argument("--kmeans_iters", type=int, default=30)
    a = p.parse_args()
    overrides: dict = {}
    for item in a.set:  # NAME=VALUE for a seed parameter, GROUP.NAME=VALUE for the others
        name, _, value = item.partition("=")
        group, _, field = name.rpartition(".")
        if group:
            overrides.setdefault(group, {})[field] = ast.literal_eval(value)
        else:
            overrides[name] = ast.literal_eval(value)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(a.seed)
    lpips = a.lpips_vgg_weights is not None
    groups = {"losses": {"lpips_vgg_weights": a.lpips_vgg_weights},
              "quantizer": {"restart_dead_codes": not a.no_restart},
              "optimization": {"warmup_steps": 200, **({"grad_clip_norm": 1.0} if a.gan else {})},
              "speed": {"compile": a.compile}}
    if a.gan:
        groups["adversarial"] = {"disc_start": a.disc_start, "disc_ramp_steps": a.disc_ramp_steps, "disc_norm": "group"}
    for name, value in overrides.items():
        groups[name] = {**groups.get(name, {}), **value} if isinstance(value, dict) else value
    model = VQVAEModel(
        use_lpips=lpips, lambda_perc=0.5 if lpips else 0.0, log_every_n_steps=a.log_every, log_images_every_n_steps=10**9,
        **(dict(lambda_gan=a.lambda_gan, betas=(0.5, 0.9)) if a.gan else {}), **groups,
    )
    data = AnimeDataModule(a.data_dir, batch_size=a.batch_size, val_split=0.05, image_size=a.image_size,
                           num_workers=a.workers)
    logger = CSVLogger(a.out, name=a.name, version="")
    # Lightning's max_steps counts optimizer steps: two per batch once the discriminator runs.
    max_steps = a.steps if not a.gan else a.disc_start + 2 * max(0, a.steps - a.disc_start)
    trainer = pl.Trainer(accelerator=a.accelerator, devices=1, precision=a.precision, max_steps=max_steps,
                         val_check_interval=a.val_every, check_val_every_n_epoch=None, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, benchmark=True,
                         num_sanity_val_steps=0, callbacks=[sharpness := Sharpness()])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    rows = read_metrics(Path(logger.log_dir) / "metrics.csv")
    val = [r for r in rows if "val/recon_loss" in r]
    train = [r for r in rows if "train/code_usage_rate" in r]
    print(f"\n{a.name}: {model.batches_seen} batches in {seconds:.0f} s on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"{'batch':>6} {'val/recon':>10} {'val/usage':>10} {'val/ppl':>8} {'sharpness':>10}")
    for r, (batch, sharp) in zip(val, sharpness.rows):
        print(f"{batch:>6} {r['val/recon_loss']:>10.4f} {r['val/code_usage_rate']:>10.3f} "
              f"{r['val/perplexity']:>8.1f} {sharp:>10.3f}")
    speeds = [r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r]
    if speeds:
        later = sorted(speeds[len(speeds) // 2 :])  # after compilation and warm-up
        print(f"training throughput on these files: {later[len(later) // 2]:.1f} images/s (median of the "
              f"last {len(later)} logging intervals)")
    if train:
        last = train[-1]
        print(f"train (last {model.config.logging.usage_window} batches): usage {last['train/code_usage_rate']:.3f}, "
              f"perplexity {last['train/perplexity']:.1f}")
    device = torch.device("cuda" if a.accelerator == "gpu" else "cpu")
    # The validation codes as validation computes them (bf16 on a GPU), kept for --kmeans_check.
    val_latents = lookup_latents(model, data.val_dataloader(), device)
    codes = score_codebook(model.tokenizer.quantizer.embedding.detach().float(), val_latents)
    print("validation codes: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in codes.items()))
    summary = {"name": a.name, "batches": model.batches_seen, "seconds": seconds, "val": val, "codes": codes,
               "sharpness": sharpness.rows,
               "train_usage": [(r["step"], r["train/code_usage_rate"], r["train/perplexity"]) for r in train]}
    if a.kmeans_check:
        summary["kmeans_check"] = kmeans_check(model, data, val_latents, device, a.kmeans_images, a.kmeans_iters)
    (a.out / f"{a.name}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
