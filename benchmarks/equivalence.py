"""Do the speed-ups change results? Short GPU training runs before and after each one.

    python benchmarks/equivalence.py .data/emoji --steps 40

Every run trains from the same initial weights on the same real images (batch 32, 256×256)
and records each step's losses. The speed-ups are switched on one at a time, in the order
they were made, each compared with the run before it:

    VQ-VAE: bf16 eager NCHW, literal upsampling → channels_last → torch.compile
            → phase-conv upsampling (the final configuration)
            → fused GroupNorm + SiLU (``speed.fused_norm``, off by default)
            → GroupNorm + SiLU from per-channel sums (``animevq.nn.blocks.CHANNEL_SUMS``, a
              candidate; compared with the final configuration)
    VQ-GAN: textbook generator step (adaptive weight through the whole graph) → the
            single-pass step → all of the above

``--last K`` runs the float32 and bf16 baselines (for the noise) and only the last K changes,
the first of them compared with the bf16 baseline.

"bf16 noise" is the same comparison between a float32 run and the bf16 baseline: a speed-up
changes nothing beyond rounding if its differences are of that size or smaller. Training is
chaotic (argmin code assignments flip on rounding), so differences grow along a run; the
table shows the mean relative difference over the first 10 steps and over all of them.

    python benchmarks/equivalence.py .data/emoji --steps 30 --baseline /path/to/animevq-0.1/src

``--baseline SRC`` compares versions instead: the final configuration trained twice by this
checkout (run-to-run noise: compiled kernels and atomics are not bit-reproducible) and once by
the animevq package under ``SRC`` (an older checkout's src/, run in its own process), from the
same seed and the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

# ANIMEVQ_SRC: the package a --baseline run imports (this checkout's by default).
sys.path.insert(0, os.environ.get("ANIMEVQ_SRC", str(Path(__file__).resolve().parents[1] / "src")))

import lightning.pytorch as pl  # noqa: E402
from PIL import Image  # noqa: E402

from animevq.nn.blocks import Upsample  # noqa: E402

try:
    from animevq.train.module import VQVAEModel  # noqa: E402
    from animevq.train.losses import adaptive_weight, generator_loss, ramp_weight  # noqa: E402
    from animevq.train.objective import GeneratorOutput  # noqa: E402
    GROUPED = True
except ImportError:  # animevq 0.1 (a --baseline run): every knob a flat argument
    from animevq.lightning_module import VQVAEModel  # noqa: E402
    GROUPED = False

# The settings as 0.1 spelled them (flat); ``arguments`` groups them for 0.2.
SMALL_LR = dict(learning_rate=1e-4, warmup_steps=0, log_every_n_steps=10**9, log_images_every_n_steps=10**9)
VQVAE = dict(SMALL_LR, use_lpips=False, lambda_perc=0.0)
VQGAN = dict(SMALL_LR, use_lpips=True, lpips_random_init=True, lambda_gan=0.1, disc_start=0, disc_norm="group")
GROUP_OF = {"warmup_steps": "optimization", "lpips_random_init": "losses", "disc_start": "adversarial",
            "disc_norm": "adversarial", "channels_last": "speed", "compile": "speed", "fused_norm": "speed"}


ACCELERATOR = ["gpu"]


def arguments(flat: dict) -> dict:
    """VQVAEModel's arguments for the package imported."""
    if not GROUPED:
        return flat
    out: dict = {}
    for key, value in flat.items():
        if key in GROUP_OF:
            out.setdefault(GROUP_OF[key], {})[key] = value
        else:
            out[key] = value
    return out


class Recorded(VQVAEModel):
    """VQVAEModel that keeps every training step's losses as floats."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[dict[str, float]] = []

    def after_train_batch(self, x, out, extra) -> None:
        row = {"total": out.total_loss, "recon": out.recon_loss, "vq": out.vq_loss}
        if "train/g_loss" in extra:
            row["g_loss"] = extra["train/g_loss"]
        self.record.append({k: float(v.detach()) for k, v in row.items()})
        super().after_train_batch(x, out, extra)

    def use_textbook_generator(self) -> None:
        """Before the single-pass rewrite: ∇_W of both losses through the whole graph."""
        objective = self.objective

        def textbook(x, x_rec, q, *, batch, last_layer, loss_scale=1.0):
            cfg, adv = objective.config, objective.adversarial
            losses = objective(x, x_rec, q)
            g_loss = generator_loss(objective.discriminator(x_rec), adv.disc_loss)
            nll = cfg.lambda_rec * losses.recon_loss + cfg.lambda_perc * losses.perc_loss
            weight = adaptive_weight(nll, g_loss, last_layer, max_weight=adv.disc_weight_max)
            d_weight = weight * (cfg.lambda_gan * ramp_weight(batch, adv.disc_start, adv.disc_ramp_steps))
            return GeneratorOutput(losses, g_loss.detach(), d_weight, losses.total_loss + d_weight * g_loss)

        objective.generator = textbook  # this model only: the step as it was


def load_batches(folder: Path, steps: int, batch: int, size: int) -> list[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    need = steps * batch
    if len(files) < need:
        raise SystemExit(f"{folder} has {len(files)} images; {steps} steps of {batch} need {need}")
    images = []
    for path in files[:need]:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return list(x.split(batch))


def run(name: str, kwargs: dict, state: dict | None, batches: list[torch.Tensor], *, precision: str = "bf16-mixed",
        channels_last: bool = False, compile: bool = False, phase_conv: bool = False,
        textbook: bool = False, fused_norm: bool = False, channel_sums: bool = False) -> list[dict[str, float]]:
    torch.manual_seed(0)
    speed = dict(channels_last=channels_last, compile=compile) | ({"fused_norm": fused_norm} if GROUPED else {})
    model = Recorded(**arguments(dict(kwargs, **speed)))
    if state is not None:
        model.load_state_dict(state)
    if textbook:
        model.use_textbook_generator()
    if channel_sums:  # not in older versions: imported only when asked for
        from animevq.nn.blocks import CHANNEL_SUMS, set_norm_silu_kernel

        set_norm_silu_kernel(model, CHANNEL_SUMS)
    initial_sha = tokenizer_sha256(model)
    for module in model.modules():
        if isinstance(module, Upsample):
            module.phase_conv = phase_conv
    trainer = pl.Trainer(accelerator=ACCELERATOR[0], devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_epochs=1, limit_val_batches=0, benchmark=False, deterministic=False)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    print(f"  {name}: {len(model.record)} steps, last total loss {model.record[-1]['total']:.5f}", flush=True)
    model.record.insert(0, {"initial_weights": initial_sha})
    return model.record


def tokenizer_sha256(model: VQVAEModel) -> str:
    """The tokenizer's weights hash, computed alike by 0.1 and 0.2."""
    if GROUPED:
        return model.tokenizer.weights_sha256()
    from animevq.checkpoint import weights_sha256

    return weights_sha256(model)


def rel_diff(a: list[dict[str, float]], b: list[dict[str, float]], key: str, upto: int | None = None) -> float:
    a, b = a[1:], b[1:]  # after the initial weights' hash
    pairs = list(zip(a, b))[:upto]
    return statistics.mean(abs(x[key] - y[key]) / max(abs(y[key]), 1e-8) for x, y in pairs if key in x and key in y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["vqvae", "vqgan"], choices=["vqvae", "vqgan"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--baseline", type=Path, default=None, help="src/ of another animevq: compare versions")
    p.add_argument("--accelerator", default="gpu", help="cpu: a smoke test of the script, not a measurement")
    p.add_argument("--eager", action="store_true", help="--baseline: the final configuration without compiling")
    p.add_argument("--last", type=int, default=None, help="only the last K changes (after the two baselines)")
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)  # a baseline process's output
    args = p.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/equivalence.py needs a CUDA GPU (or --accelerator cpu for a smoke test)")
    ACCELERATOR[0] = args.accelerator
    # The float32 reference is true float32: no TF32 in convolutions or matrix products.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = load_batches(args.data_dir, args.steps, args.batch, args.size)
    if args.record or args.baseline:
        compare_versions(args, batches)
        return
    results: dict[str, dict[str, list]] = {}
    table = []
    for variant in args.variants:
        kwargs = VQVAE if variant == "vqvae" else VQGAN
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in VQVAEModel(**arguments(kwargs)).state_dict().items()}
        gan = variant == "vqgan"
        chain = [("float32 eager", dict(precision="32-true", textbook=gan)),
                 ("bf16 eager NCHW" + (" textbook step" if gan else ""), dict(textbook=gan))]
        if gan:
            chain.append(("+ single-pass generator step", {}))
        chain += [("+ channels_last", dict(channels_last=True)),
                  ("+ torch.compile", dict(channels_last=True, compile=True)),
                  (FINAL_ROW, dict(FINAL)),
                  ("+ fused GroupNorm + SiLU (opt-in)", dict(FINAL, fused_norm=True)),
                  (CHANNEL_SUMS_ROW, dict(FINAL, channel_sums=True))]
        if args.last is not None:
            chain = chain[:2] + chain[-args.last:]
        print(f"{variant}:", flush=True)
        runs = {name: run(name, kwargs, state, batches, **opts) for name, opts in chain}
        results[variant] = runs
        names = list(runs)
        keys = ("total", "g_loss") if gan else ("total",)
        for i in range(1, len(names)):
            ref = FINAL_ROW if names[i] == CHANNEL_SUMS_ROW and FINAL_ROW in runs else names[i - 1]
            label = "bf16 noise (vs float32)" if i == 1 else names[i]
            row = [variant, label, ref]
            for key in keys:
                row += [rel_diff(runs[names[i]], runs[ref], key, 10), rel_diff(runs[names[i]], runs[ref], key)]
            table.append(row)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{card}, torch {torch.__version__}, {args.steps} steps of {args.batch} "
          f"real images at {args.size}px; mean relative difference of the step losses vs the previous run")
    print(f"{'variant':<7} {'change':<34}{'total, 10 steps':>16}{'all steps':>11}{'G loss, 10':>12}{'all':>9}")
    for row in table:
        cells = "".join(f"{v:>16.2e}" if i == 0 else f"{v:>11.2e}" if i == 1 else f"{v:>12.2e}" if i == 2 else
                        f"{v:>9.2e}" for i, v in enumerate(row[3:]))
        print(f"{row[0]:<7} {row[1]:<34}{cells}")
    if args.json:
        args.json.write_text(json.dumps({"card": torch.cuda.get_device_name(), "runs": results}, indent=1))


FINAL = dict(channels_last=True, compile=True, phase_conv=True)  # what the presets train with
FINAL_ROW = "+ phase-conv upsampling (final)"
CHANNEL_SUMS_ROW = "+ channel-sums GroupNorm (candidate)"


def compare_versions(args: argparse.Namespace, batches: list[torch.Tensor]) -> None:
    """This checkout's final configuration twice, and the baseline's once (in a subprocess)."""
    variants = {"vqvae": VQVAE, "vqgan": VQGAN}
    final = dict(FINAL, compile=not args.eager)
    if args.record:  # inside the baseline's process: record and leave
        runs = {v: run(f"{v} (baseline)", variants[v], None, batches, **final) for v in args.variants}
        args.record.write_text(json.dumps(runs))
        return
    record = Path(args.json or "equivalence-versions.json").with_suffix(".baseline.json")
    command = [sys.executable, __file__, str(args.data_dir), "--steps", str(args.steps), "--batch", str(args.batch),
               "--size", str(args.size), "--variants", *args.variants, "--record", str(record),
               "--accelerator", args.accelerator, *(["--eager"] if args.eager else [])]
    subprocess.run(command, check=True, env=dict(os.environ, ANIMEVQ_SRC=str(args.baseline.resolve())))
    baseline = json.loads(record.read_text())
    card = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU (smoke test)"
    print(f"\n{card}, torch {torch.__version__}, {args.steps} steps of {args.batch} real images at {args.size}px, "
          f"bf16, channels_last, {'eager' if args.eager else 'compiled'}; mean relative difference of the step losses")
    print(f"{'variant':<7} {'comparison':<40}{'total, 10 steps':>16}{'all steps':>11}{'G loss, all':>13}")
    results = {}
    for variant in args.variants:
        runs = {"this": run(f"{variant} (this)", variants[variant], None, batches, **final),
                "this, again": run(f"{variant} (this, again)", variants[variant], None, batches, **final),
                "baseline": baseline[variant]}
        results[variant] = runs
        same_start = runs["this"][0] == runs["baseline"][0]
        for label, a, b in (("this vs this again (run-to-run noise)", "this, again", "this"),
                            (f"this vs baseline (same start: {same_start})", "baseline", "this")):
            g = f"{rel_diff(runs[a], runs[b], 'g_loss'):>13.2e}" if variant == "vqgan" else ""
            print(f"{variant:<7} {label:<40}{rel_diff(runs[a], runs[b], 'total', 10):>16.2e}"
                  f"{rel_diff(runs[a], runs[b], 'total'):>11.2e}{g}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
