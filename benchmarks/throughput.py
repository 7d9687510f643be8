"""GPU throughput of animevq's training step and tokenizer (not a test; run on a GPU).

    python benchmarks/throughput.py                    # all variants, 256×256, batch 32, bf16-mixed
    python benchmarks/throughput.py --variants vqvae --steps 30
    python benchmarks/throughput.py --variants vqvae --compile --profile   # where the time goes
    python benchmarks/throughput.py --compile --quantizers vq fsq lfq simvq ibq   # every family

For each variant it runs real Lightning training steps (optimizer included) on random
images already on the device, times the steps after warm-up with CUDA events (no host
synchronisation between steps, as in a training run), and counts
the FLOPs of one step with torch's FlopCounterMode (counted, not assumed). It also times
encoder-only tokenizing. Prints a table; ``--json`` writes the numbers.

"% of peak" is model FLOPs utilisation: the FLOPs of the architecture as specified
(nearest upsample, then a 3×3 conv at the upsampled size), counted with the literal
upsampling, over the step time. The decoder actually runs the exact low-resolution form of
those convs (``animevq.nn.blocks.upsample_conv3x3``), which needs fewer FLOPs: the table
shows those executed FLOPs too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lightning.pytorch as pl  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from animevq.train.module import VQVAEModel  # noqa: E402
from animevq.nn.blocks import CHANNEL_SUMS, Upsample, set_norm_silu_kernel  # noqa: E402
from animevq.train.speed import compiled_parts, fuse_norms  # noqa: E402

# torch.compile modes that capture CUDA graphs. speed.compile_mode does not offer them (not yet
# measured with Lightning's step); this script compiles the same parts itself for them.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0}  # SPEC §8: ≈800 dense bf16 achievable (datasheet 989)
RANDOM_LPIPS = {"losses": {"lpips_random_init": True}}  # same FLOPs as the pretrained VGG16
VARIANTS = {
    "vqvae+lpips": dict(use_lpips=True, **RANDOM_LPIPS),
    "vqvae": dict(use_lpips=False, lambda_perc=0.0),
    "vqgan": dict(use_lpips=True, lambda_gan=0.1, adversarial={"disc_start": 0, "disc_norm": "group"}, **RANDOM_LPIPS),
}

QUANTIZERS = {path.stem: path for path in sorted((ROOT / "configs" / "quantizer").glob("*.yaml"))}


def quantizer_overlay(name: str) -> dict:
    """The model settings of ``configs/quantizer/NAME.yaml`` (what ``--config`` adds to a fit)."""
    return yaml.safe_load(QUANTIZERS[name].read_text())["model"]


class StepTimer(pl.Callback):
    """CUDA-event time of every training batch, without a host synchronisation per step.

    An event is queued as each batch starts and one after the last; the time of batch i is
    the time between the events of batches i and i+1, read once training has ended. Waiting
    on each step's end instead would leave the GPU idle while the host prepares the next
    step, which a training run does not do. On the CPU (smoke runs) the host's clock.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._events: list[torch.cuda.Event | float] = []

    def _mark(self, on_cuda: bool) -> None:
        if not on_cuda:
            self._events.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append(event)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark(pl_module.device.type == "cuda")

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark(pl_module.device.type == "cuda")
        pairs = list(zip(self._events, self._events[1:]))
        if isinstance(self._events[-1], float):
            self.times = [b - a for a, b in pairs]
            return
        self._events[-1].synchronize()
        self.times = [a.elapsed_time(b) / 1000.0 for a, b in pairs]


def random_batches(n: int, batch: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.rand(batch, 3, size, size, device="cuda", generator=g) * 2 - 1 for _ in range(n)]


def set_phase_conv(model: torch.nn.Module, enabled: bool) -> None:
    """Run the decoder's upsampling convs in the low-resolution form (True) or literally."""
    for module in model.modules():
        if isinstance(module, Upsample):
            module.phase_conv = enabled


def count_step_flops(model: VQVAEModel, x: torch.Tensor, phase_conv: bool = True) -> float:
    """FLOPs of one forward + backward of the training loss (the discriminator included)."""
    model.train()
    set_phase_conv(model, phase_conv)
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        loss = out.total_loss
        discriminator = model.objective.discriminator
        if discriminator is not None:
            loss = loss + discriminator(out.reconstruction).mean()
            loss = loss + discriminator(x).mean() + discriminator(out.reconstruction.detach()).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class Profile(pl.Callback):
    """torch.profiler over a few steps after warm-up; prints where the GPU time goes."""

    def __init__(self, first: int, steps: int = 3) -> None:
        self.first, self.last = first, first + steps
        self.prof: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last - 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.report(self.last - self.first)

    def report(self, steps: int) -> None:
        events = [e for e in self.prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA and kernel_kind(e.key) != "annotation"]
        total = sum(e.self_device_time_total for e in events) / steps / 1e3
        groups: dict[str, float] = {}
        for e in events:
            groups[kernel_kind(e.key)] = groups.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / steps / 1e3
        print(f"\nGPU time per step {total:.1f} ms: " + ", ".join(
            f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
            ms = e.self_device_time_total / steps / 1e3
            print(f"{ms:8.2f} ms {e.count // steps:4d}x  {kernel_kind(e.key):<12} {e.key[:110]}")
        self.report_copies(steps)

    def report_copies(self, steps: int) -> None:
        """Which operators launch the plain copy kernels (layout changes, clones)."""
        origins: dict[str, list[float]] = {}
        for e in self.prof.events():
            copy_us = sum(k.duration for k in e.kernels if "direct_copy" in k.name or "copy_kernel" in k.name)
            if copy_us <= 0:
                continue
            chain, parent = [e.name], e.cpu_parent
            while parent is not None and len(chain) < 5:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = " < ".join(chain) + f"  {e.input_shapes}"
            entry = origins.setdefault(key, [0.0, 0])
            entry[0] += copy_us / steps / 1e3
            entry[1] += 1
        print("copy kernels by launching operator (ms per step, launches per step):")
        for key, (ms, n) in sorted(origins.items(), key=lambda kv: -kv[1][0])[:15]:
            print(f"{ms:8.2f} ms {n // steps:4d}x  {key[:240]}")


class SyncDebug(pl.Callback):
    """Reports every host synchronisation in a few steps after warm-up, with where it happens
    (torch.cuda.set_sync_debug_mode): the hot loop should have none."""

    def __init__(self, first: int, steps: int = 2) -> None:
        self.first, self.last = first, first + steps
        self.stacks: dict[str, int] = {}

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            here = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename][-6:]
            key = str(message).split("\n")[0][:80] + "\n" + "".join(
                f"      {Path(f.filename).name}:{f.lineno} {f.name}\n" for f in here)
            self.stacks[key] = self.stacks.get(key, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self._show, warnings.showwarning = warnings.showwarning, self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last - 1:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show
            print(f"host synchronisations in {self.last - self.first} steps: {sum(self.stacks.values())}")
            for key, n in sorted(self.stacks.items(), key=lambda kv: -kv[1]):
                print(f"  {n}x {key}")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if name.startswith("## "):  # a range annotation (a compiled graph's call), not a kernel
        return "annotation"
    if "triton" in low:
        return "triton"
    if any(k in low for k in ("conv", "xmma", "implicit", "cudnn", "dgrad", "wgrad", "fprop")):
        return "conv"
    if any(k in low for k in ("gemm", "cutlass", "sm90_", "nvjet", "cublas")):
        return "gemm"
    if "memcpy" in low or "memset" in low:
        return "copy"
    return "other"


class CudagraphStep(pl.Callback):
    """Tells CUDA-graph trees where each training step begins (what a loop that keeps no
    output of a previous step's graphs needs)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.compiler.cudagraph_mark_step_begin()


def bench_train(name: str, args: argparse.Namespace, quantizer: str = "vq") -> dict:
    torch.manual_seed(0)
    graphs = args.compile and args.compile_mode in CUDAGRAPH_MODES
    model = VQVAEModel(log_every_n_steps=10**9, log_images_every_n_steps=10**9, optimization={"warmup_steps": 0},
                       speed={"channels_last": args.channels_last, "compile": args.compile and not graphs,
                              "compile_mode": "default" if graphs else args.compile_mode,
                              "fused_norm": args.fused_norm},
                       **VARIANTS[name], **quantizer_overlay(quantizer),
                       safety={"max_nonfinite_steps": 10 if args.guard else None}).cuda()
    if args.channel_sums:
        set_norm_silu_kernel(model, CHANNEL_SUMS)
    x = torch.rand(args.batch, 3, args.size, args.size, device="cuda") * 2 - 1
    flops = count_step_flops(model, x, phase_conv=False)  # the architecture's FLOPs
    executed = count_step_flops(model, x, phase_conv=args.phase_conv)
    if graphs:  # what speed_up compiles, in a mode it does not offer (after the eager FLOP counts)
        for module in compiled_parts(model):
            module.compile(mode=args.compile_mode)
    data = random_batches(4, args.batch, args.size)
    loader = torch.utils.data.DataLoader(data * ((args.steps + args.warmup) // 4 + 1), batch_size=None)
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_epochs=1, limit_train_batches=args.steps + args.warmup, limit_val_batches=0,
                         callbacks=[timer] + ([CudagraphStep()] if graphs else [])
                         + ([Profile(args.warmup)] if args.profile else [])
                         + ([SyncDebug(args.warmup + 4)] if args.sync_debug else []), benchmark=True)
    trainer.fit(model, train_dataloaders=loader)
    times = timer.times[args.warmup:]
    step = statistics.median(times)
    tflops = flops / step / 1e12
    return {
        "variant": name if quantizer == "vq" else f"{name} {quantizer}", "images_per_s": args.batch / step,
        "step_ms": step * 1e3,
        "gflop_per_image": flops / args.batch / 1e9, "executed_gflop_per_image": executed / args.batch / 1e9,
        "tflops": tflops,
        "peak_pct": 100 * tflops / args.peak, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


@torch.no_grad()
def bench_encode(args: argparse.Namespace) -> dict:
    model = VQVAEModel(use_lpips=False).cuda().eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.fused_norm:
        fuse_norms(model)
    if args.channel_sums:
        set_norm_silu_kernel(model, CHANNEL_SUMS)
    if args.compile:
        model.tokenizer.encoder.compile(mode=args.compile_mode)
    x = torch.rand(args.encode_batch, 3, args.size, args.size, device="cuda") * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(args.warmup + args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.encode(x)
        end.record()
        end.synchronize()
        if i >= args.warmup:
            times.append(start.elapsed_time(end) / 1000)
    return {"variant": "encode (tokenize)", "images_per_s": args.encode_batch / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--quantizers", nargs="+", default=["vq"], choices=list(QUANTIZERS),
                   help="quantizer families, as configs/quantizer/NAME.yaml (vq: the default)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--encode_batch", type=int, default=256)
    p.add_argument("--peak", type=float, default=None, help="dense bf16 TFLOP/s of the card (default: datasheet)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (model option compile)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "max-autotune-no-cudagraphs", *CUDAGRAPH_MODES])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--fused-norm", action="store_true",
                   help="GroupNorm + SiLU in animevq.kernels, not by PyTorch/Inductor (model option fused_norm)")
    p.add_argument("--channel-sums", action="store_true",
                   help="GroupNorm + SiLU from per-channel sums (animevq.nn.blocks.CHANNEL_SUMS), compiled by Inductor")
    p.add_argument("--literal-upsample", dest="phase_conv", action="store_false",
                   help="run nearest-upsample + 3×3 conv literally (the 'before' of the phase rewrite)")
    p.add_argument("--no-guard", dest="guard", action="store_false",
                   help="max_nonfinite_steps=None: no non-finite-loss check (and its host sync) per step")
    p.add_argument("--profile", action="store_true", help="print a kernel-time breakdown of 3 steps per variant")
    p.add_argument("--sync-debug", action="store_true", help="list the host synchronisations of 2 steps per variant")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/throughput.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    args.peak = args.peak or next((v for k, v in PEAK_TFLOPS.items() if k in card), 800.0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    benches = [lambda v=v, q=q: bench_train(v, args, q) for q in args.quantizers for v in args.variants]
    for bench in benches + [lambda: bench_encode(args)]:
        try:
            rows.append(bench())
        except Exception:  # noqa: BLE001 - one failing configuration must not lose the others' rows
            traceback.print_exc()
            torch._dynamo.reset()
            continue
        print(f"done: {json.dumps(rows[-1])}", flush=True)  # kept if a later row is cut short
    print(f"\n{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, batch {args.batch}, "
          f"{args.size}×{args.size}, bf16-mixed, channels_last={args.channels_last}, compile={args.compile} "
          f"({args.compile_mode}), fused_norm={args.fused_norm}, channel_sums={args.channel_sums}, "
          f"peak {args.peak:.0f} TFLOP/s")
    print(f"phase-conv upsampling={args.phase_conv}; TFLOP/s and % of peak use the architecture's FLOPs")
    print(f"{'variant':<24}{'img/s':>9}{'ms/step':>9}{'GFLOP/img':>11}{'executed':>10}{'TFLOP/s':>9}"
          f"{'% peak':>8}{'mem GiB':>9}")
    for r in rows:
        if "tflops" in r:
            print(f"{r['variant']:<24}{r['images_per_s']:>9.1f}{r['step_ms']:>9.1f}{r['gflop_per_image']:>11.1f}"
                  f"{r['executed_gflop_per_image']:>10.1f}{r['tflops']:>9.1f}{r['peak_pct']:>8.1f}"
                  f"{r['peak_mem_gib']:>9.1f}")
        else:
            print(f"{r['variant']:<24}{r['images_per_s']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
