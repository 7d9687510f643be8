"""GPU training from a prepared LitData dataset against random data, in one process (not a
test; run on a GPU).

    python -m animevq prepare IMAGES /tmp/prepared --size 256
    python benchmarks/streaming.py /tmp/prepared --compile --workers 12

The same model (throughput.py's variant, default VQ-VAE without LPIPS), batch and precision
train ``--steps`` timed batches after ``--warmup``, twice: from random images already on the
GPU (the ceiling), then through ``AnimeDataModule`` on the dataset (LitData's loader with
``--workers`` processes, pinned memory, crops and flips). images/s is the wall-clock rate
over the timed batches (the mean, so loader stalls count), measured between CUDA events.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning.pytorch as pl  # noqa: E402
from throughput import VARIANTS, StepTimer, random_batches  # noqa: E402

from animevq.data import AnimeDataModule  # noqa: E402
from animevq.train.module import VQVAEModel  # noqa: E402


def train_rate(args: argparse.Namespace, datamodule: AnimeDataModule | None) -> dict:
    torch.manual_seed(0)
    model = VQVAEModel(log_every_n_steps=10**9, log_images_every_n_steps=10**9,
                       optimization={"warmup_steps": 0}, speed={"compile": args.compile},
                       **VARIANTS[args.variant])
    total = args.steps + args.warmup
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=total, limit_val_batches=0, callbacks=[timer], benchmark=True)
    if datamodule is None:
        data = random_batches(4, args.batch, args.size)
        loader = torch.utils.data.DataLoader(data * (total // 4 + 1), batch_size=None)
        trainer.fit(model, train_dataloaders=loader)
    else:
        trainer.fit(model, datamodule=datamodule)
    times = timer.times[args.warmup : total]
    mean = sum(times) / len(times)
    return {"images_per_s": args.batch / mean, "step_ms": mean * 1e3, "steps": len(times),
            "slowest_step_ms": max(times) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="a dataset written by `animevq prepare` (folder or URL)")
    p.add_argument("--variant", default="vqvae", choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "variant": args.variant,
               "batch": args.batch, "compile": args.compile, "workers": args.workers}
    results["random"] = train_rate(args, None)
    print(f"random data : {results['random']['images_per_s']:8.1f} images/s", flush=True)
    datamodule = AnimeDataModule(args.data_dir, batch_size=args.batch, image_size=args.size, val_split=0.0,
                                 num_workers=args.workers)
    results["litdata"] = train_rate(args, datamodule)
    ratio = results["litdata"]["images_per_s"] / results["random"]["images_per_s"]
    results["litdata_vs_random_pct"] = 100 * (ratio - 1)
    print(f"LitData     : {results['litdata']['images_per_s']:8.1f} images/s ({100 * (ratio - 1):+.1f} %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
