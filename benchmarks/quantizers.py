"""Every quantizer family at about 1k and 16k codes, each trained for the same wall-clock time
(GPU; not a test).

    python benchmarks/quantizers.py DATA_DIR --seconds 60 --out results.json
    python benchmarks/quantizers.py DATA_DIR --variants fsq-1k,lfq-1k --seconds 60

Trains ``VQVAEModel`` with the seed's architecture (no LPIPS, so no pretrained weights) at
``--image_size`` with batch 32 in bf16-mixed and channels_last, eager (compilation would spend
part of a short budget differently for each family), through a real Lightning Trainer bounded
by ``max_time``. Every 10th image (sorted by name) is held out; on those the tokenizer, in
float32 and eval mode, is scored: PSNR, SSIM, L1, code usage and perplexity over the held-out
codes. Training images/s come from the steps after the first 20 (CUDA-synchronised marks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from animevq.nn.quantizers import code_counts, code_stats  # noqa: E402
from animevq.tools import metrics  # noqa: E402
from animevq.train.module import VQVAEModel  # noqa: E402

BATCH = 32
WARMUP_STEPS = 20
# name → (seed parameters, quantizer group): about 1k and about 16k codes per family.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "vq-1k": ({"num_embeddings": 1024, "embedding_dim": 256}, {"family": "vq"}),
    "vq-16k": ({"num_embeddings": 16384, "embedding_dim": 8}, {"family": "vq", "l2_normalize_codes": True}),
    "fsq-1k": ({"num_embeddings": 1000, "embedding_dim": 4}, {"family": "fsq", "levels": [8, 5, 5, 5]}),
    "fsq-16k": ({"num_embeddings": 15360, "embedding_dim": 5}, {"family": "fsq", "levels": [8, 8, 8, 6, 5]}),
    "lfq-1k": ({"num_embeddings": 1024, "embedding_dim": 10}, {"family": "lfq"}),
    "lfq-16k": ({"num_embeddings": 16384, "embedding_dim": 14}, {"family": "lfq"}),
    "simvq-1k": ({"num_embeddings": 1024, "embedding_dim": 256}, {"family": "simvq"}),
    "simvq-16k": ({"num_embeddings": 16384, "embedding_dim": 256}, {"family": "simvq"}),
    "ibq-1k": ({"num_embeddings": 1024, "embedding_dim": 256}, {"family": "ibq"}),
    "ibq-16k": ({"num_embeddings": 16384, "embedding_dim": 256}, {"family": "ibq"}),
}


def load(files: list[Path], size: int) -> torch.Tensor:
    """(N,3,S,S) uint8 images."""
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class GpuBatches(torch.utils.data.IterableDataset):
    """Endless random batches of the training images, already on the GPU, in [-1,1], flipped at random."""

    def __init__(self, images: torch.Tensor, seed: int) -> None:
        self.images, self.seed = images, seed

    def __iter__(self):
        g = torch.Generator(device=self.images.device).manual_seed(self.seed)
        while True:
            pick = torch.randint(self.images.shape[0], (BATCH,), device=self.images.device, generator=g)
            x = self.images[pick].float().div_(127.5).sub_(1)
            flip = torch.rand(BATCH, 1, 1, 1, device=x.device, generator=g) < 0.5
            yield torch.where(flip, x.flip(3), x)


class Marks(pl.Callback):
    """Synchronised time marks every 25 steps after warm-up: the training throughput."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = batch_idx + 1
        if step >= WARMUP_STEPS and (step - WARMUP_STEPS) % 25 == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((step, time.perf_counter()))

    def images_per_second(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (s1 - s0) * BATCH / (t1 - t0)


@torch.no_grad()
def score(model: VQVAEModel, held_out: torch.Tensor) -> dict[str, float]:
    tokenizer = model.tokenizer.eval().float()
    k = tokenizer.codebook_size
    counts = torch.zeros(k, device=held_out.device)
    psnr, ssim, l1 = [], [], []
    for chunk in held_out.split(64):
        x = chunk.float().div(127.5).sub(1).contiguous(memory_format=torch.channels_last)
        out = tokenizer(x)
        rec = out.reconstruction.clamp(-1, 1)
        counts += code_counts(out.indices, k)
        x01, rec01 = (x + 1) / 2, (rec + 1) / 2
        psnr.append(metrics.psnr(x01, rec01))
        ssim.append(metrics.ssim(x01, rec01))
        l1.append((x - rec).abs().mean(dim=(1, 2, 3)))
    perplexity, usage = code_stats(counts)
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean()),
            "l1": float(torch.cat(l1).mean()), "code_usage_rate": float(usage), "perplexity": float(perplexity),
            "codebook_size": k}


def run(name: str, train: torch.Tensor, held_out: torch.Tensor, seconds: float) -> dict:
    seed, group = VARIANTS[name]
    pl.seed_everything(0, verbose=False)
    model = VQVAEModel(**seed, use_lpips=False, lambda_perc=0.0, log_every_n_steps=10**9,
                       log_images_every_n_steps=10**9, quantizer=group,
                       optimization={"warmup_steps": 200, "lr_schedule": "constant"})
    marks = Marks()
    trainer = pl.Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision="bf16-mixed", max_time=datetime.timedelta(seconds=seconds),
                         max_steps=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[marks])
    loader = torch.utils.data.DataLoader(GpuBatches(train, seed=0), batch_size=None)
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    result = {"variant": name, "steps": trainer.global_step, "train_seconds": round(elapsed, 1),
              "images_per_sec": marks.images_per_second(), **score(model.to(held_out.device), held_out)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--limit", type=int, help="at most this many training and held-out images (smoke runs)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    files = sorted(p for p in args.data_dir.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a smoke run of this script
    images = load([f for i, f in enumerate(files) if i % 10][: args.limit], args.image_size).to(device)
    held_out = load(held[: args.limit], args.image_size).to(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{images.shape[0]} training and {held_out.shape[0]} held-out images of {args.image_size} px; "
          f"{card}, torch {torch.__version__}", flush=True)
    results = [run(name, images, held_out, args.seconds) for name in args.variants.split(",")]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
