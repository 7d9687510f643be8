"""Multi-GPU (DDP) training throughput and codebook agreement across ranks (GPU; not a test).

    python benchmarks/ddp.py --devices 1 --compile && python benchmarks/ddp.py --devices 2 --compile
    python benchmarks/ddp.py --devices 2 --compile --variant vqgan --quantizer fsq
    python benchmarks/ddp.py --devices 2 --accelerator cpu --size 32 --batch 2 --steps 3 --warmup 1  # gloo smoke run

Each rank trains on its own random images (batch 32 per GPU, 256×256, bf16-mixed), with the
CLI's per-batch callbacks (last.ckpt, HostSigtermCheck). ``--variant`` is one of
``benchmarks/throughput.py``'s (vqvae: no LPIPS, the default here; vqgan: LPIPS and the
discriminator) and ``--quantizer`` a family's settings (``configs/quantizer/NAME.yaml``). Prints
the global images/s (median over steps after warm-up, timed on rank 0) and, at the end,
whether every rank holds the same model bit for bit: every parameter and buffer of the
tokenizer (codebook, EMA statistics, a family's projection) and of the objective
(discriminator, LeCam's averages).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning.pytorch as pl  # noqa: E402
from throughput import QUANTIZERS, VARIANTS, Profile, StepTimer, SyncDebug, quantizer_overlay  # noqa: E402

from animevq.data.datamodule import sigterm_from_parent_only  # noqa: E402
from animevq.runs.last import LastCheckpoint  # noqa: E402
from animevq.runs.sigterm import HostSigtermCheck  # noqa: E402
from animevq.train.module import VQVAEModel  # noqa: E402


class StateAgreement(pl.Callback):
    """At the end, compares every rank's tokenizer and objective (parameters and buffers) bit for
    bit with rank 0's, and prints the names of any that differ."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: VQVAEModel) -> None:
        state = {**{f"tokenizer.{k}": v for k, v in pl_module.tokenizer.state_dict().items()},
                 **{f"objective.{k}": v for k, v in pl_module.objective.state_dict().items()}}
        differ = []
        for name, value in state.items():
            gathered = trainer.strategy.all_gather(value.detach())
            if trainer.world_size == 1:
                gathered = gathered.unsqueeze(0)  # all_gather adds no rank dimension on one process
            if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
                differ.append(name)
        if trainer.is_global_zero:
            shown = f"; differ: {', '.join(differ[:8])}{' …' if len(differ) > 8 else ''}" if differ else ""
            print(f"model state identical on all {trainer.world_size} ranks: {not differ} "
                  f"({len(state)} tensors{shown})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="gpu", help="cpu: gloo processes, a smoke run of the script")
    p.add_argument("--variant", default="vqvae", choices=list(VARIANTS))
    p.add_argument("--quantizer", default="vq", choices=list(QUANTIZERS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="per GPU")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bucket_view", action="store_true", help="DDP gradient_as_bucket_view=True")
    p.add_argument("--static_graph", action="store_true", help="DDP static_graph=True")
    p.add_argument("--bucket_mb", type=float, default=None, help="DDP bucket_cap_mb (default 25)")
    p.add_argument("--no_optimize_ddp", action="store_true",
                   help="compile each network whole instead of splitting it at DDP's buckets")
    p.add_argument("--lightning_sigterm", action="store_true",
                   help="keep Lightning's SIGTERM broadcast (a host sync per batch) instead of HostSigtermCheck")
    p.add_argument("--profile", action="store_true", help="rank 0's kernel-time breakdown of 3 steps")
    p.add_argument("--sync_debug", action="store_true", help="report rank 0's host synchronisations")
    a = p.parse_args()
    if a.no_optimize_ddp:
        torch._dynamo.config.optimize_ddp = False
    ddp_kwargs = {}
    if a.bucket_view:
        ddp_kwargs["gradient_as_bucket_view"] = True
    if a.static_graph:
        ddp_kwargs["static_graph"] = True
    if a.bucket_mb is not None:
        ddp_kwargs["bucket_cap_mb"] = a.bucket_mb
    strategy = pl.strategies.DDPStrategy(**ddp_kwargs) if a.devices > 1 else "auto"
    torch.manual_seed(0)
    model = VQVAEModel(optimization={"warmup_steps": 0}, speed={"compile": a.compile}, log_every_n_steps=10**9,
                       log_images_every_n_steps=10**9, **VARIANTS[a.variant], **quantizer_overlay(a.quantizer))
    n = (a.steps + a.warmup) * a.devices
    data = [torch.rand(a.batch, 3, a.size, a.size) * 2 - 1 for _ in range(min(n, 16))]
    data = (data * (n // len(data) + 1))[:n]
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, pin_memory=a.accelerator == "gpu",
                                         worker_init_fn=sigterm_from_parent_only)  # as the CLI's loaders
    timer = StepTimer()
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0  # Lightning starts ranks > 0 with it set
    extra: list[pl.Callback] = [] if a.lightning_sigterm else [HostSigtermCheck()]
    if a.profile and rank0:
        extra.append(Profile(a.warmup))
    if a.sync_debug and rank0:
        extra.append(SyncDebug(a.warmup))
    with tempfile.TemporaryDirectory() as ckpt_dir:
        # As the CLI: LastCheckpoint agrees on SIGTERM after every batch (and saves once, at the end).
        last = LastCheckpoint(Path(ckpt_dir), every_n_steps=10**9)
        trainer = pl.Trainer(accelerator=a.accelerator, devices=a.devices, strategy=strategy,
                             precision="bf16-mixed", max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[timer, StateAgreement(), last, *extra], benchmark=a.accelerator == "gpu")
        trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        step = statistics.median(timer.times[a.warmup:])
        card = torch.cuda.get_device_name() if a.accelerator == "gpu" else "CPU"
        print(f"{a.devices} × {card}: {a.devices * a.batch / step:.1f} images/s "
              f"({step * 1e3:.1f} ms/step, {a.variant}, quantizer {a.quantizer}, batch {a.batch} per GPU, "
              f"{a.size}px, compile={a.compile}, ddp {ddp_kwargs}, "
              f"optimize_ddp={not a.no_optimize_ddp}, sigterm check {'Lightning' if a.lightning_sigterm else 'host'})",
              flush=True)


if __name__ == "__main__":
    main()
