"""GPU training from a prepared LitData dataset against random data, in one process (not a
test; run on a GPU).

    python -m animevq prepare IMAGES /tmp/prepared --size 256
    python benchmarks/streaming.py /tmp/prepared --compile --workers 12
    python benchmarks/streaming.py /tmp/prepared --compile --workers 6 --devices 2 --source random   # DDP: one
    python benchmarks/streaming.py /tmp/prepared --compile --workers 6 --devices 2 --source litdata  # source a run

The same model (throughput.py's variant, default VQ-VAE without LPIPS), batch and precision
train ``--steps`` timed batches after ``--warmup``, twice: from random images already on the
GPU (the ceiling), then through ``AnimeDataModule`` on the dataset (LitData's loader with
``--workers`` processes, pinned memory, crops and flips). images/s is the wall-clock rate
over the timed batches (the mean, so loader stalls count), measured between CUDA events on
rank 0; with ``--devices N`` (DDP) it is the global rate, N × batch per step, and the random
images come from host memory (pinned), as a loader's do. Under DDP each source runs in its own
invocation (``--source``): Lightning starts the other ranks once per script.
``--accelerator cpu`` runs gloo processes on the CPU, a smoke run of the script.
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


def train_rate(args: argparse.Namespace, datamodule: AnimeDataModule | None) -> dict | None:
    """The rate of ``--steps`` timed batches from ``datamodule`` (None: random images); None on
    ranks other than 0."""
    torch.manual_seed(0)
    model = VQVAEModel(log_every_n_steps=10**9, log_images_every_n_steps=10**9,
                       optimization={"warmup_steps": 0}, speed={"compile": args.compile},
                       **VARIANTS[args.variant])
    total = args.steps + args.warmup
    timer = StepTimer()
    gpu = args.accelerator == "gpu"
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=total, limit_val_batches=0, callbacks=[timer], benchmark=gpu)
    if datamodule is None:
        if args.devices == 1 and gpu:
            data = random_batches(4, args.batch, args.size)  # already on the GPU: the ceiling
        else:  # every rank its own, from host memory
            data = [torch.rand(args.batch, 3, args.size, args.size) * 2 - 1 for _ in range(8)]
        loader = torch.utils.data.DataLoader(data * (total * args.devices // len(data) + 1), batch_size=None,
                                             pin_memory=gpu and args.devices > 1)
        trainer.fit(model, train_dataloaders=loader)
    else:
        trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    times = timer.times[args.warmup : total]
    mean = sum(times) / len(times)
    return {"images_per_s": args.devices * args.batch / mean, "step_ms": mean * 1e3, "steps": len(times),
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
    p.add_argument("--devices", type=int, default=1, help="GPUs (DDP when > 1)")
    p.add_argument("--accelerator", default="gpu", help="cpu: gloo processes, a smoke run of the script")
    p.add_argument("--source", default="both", choices=["both", "random", "litdata"],
                   help="which to train from (one per invocation under DDP)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.devices > 1 and args.source == "both":
        p.error("--devices > 1 runs one source per invocation: pass --source random, then --source litdata")
    card = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    results = {"card": card, "devices": args.devices, "torch": torch.__version__, "variant": args.variant,
               "batch": args.batch, "compile": args.compile, "workers": args.workers}
    for source in ("random", "litdata"):
        if args.source not in ("both", source):
            continue
        datamodule = None if source == "random" else AnimeDataModule(
            args.data_dir, batch_size=args.batch, image_size=args.size, val_split=0.0, num_workers=args.workers)
        rate = train_rate(args, datamodule)
        if rate is None:  # not rank 0
            return
        results[source] = rate
        print(f"{args.devices} × {card}, {source:<8}: {rate['images_per_s']:8.1f} images/s "
              f"({rate['step_ms']:.1f} ms/step, slowest {rate['slowest_step_ms']:.1f})", flush=True)
    if "random" in results and "litdata" in results:
        ratio = results["litdata"]["images_per_s"] / results["random"]["images_per_s"]
        results["litdata_vs_random_pct"] = 100 * (ratio - 1)
        print(f"LitData against random data: {100 * (ratio - 1):+.1f} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
