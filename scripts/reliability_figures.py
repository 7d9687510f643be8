"""The figures of docs/reliability.md §13: a kill loop and a disk that fills up mid-run.

    python scripts/reliability_figures.py kill-loop --kills 24 --runs 3 --out /tmp/killloop
    python scripts/reliability_figures.py full-disk --out /tmp/fulldisk      # needs root (mounts a tmpfs)

kill-loop: trains the tiny CPU model (with a DataLoader worker, last.ckpt every 2 batches) as
several runs; each is SIGKILLed (the whole process group) at random moments and resumed with
``--ckpt_path last``, then resumed once more to the end. A quarter of the kills come at any
moment from the start (start-up, restoring, training); the others after that start's first
save, up to --max_s later, so that they land in training and in saves. After every kill each checkpoint file is verified
(every zip member's CRC, then a weights-only load). Each finished run's weights are compared
with one run never interrupted.

full-disk: the same model with its run folder on a tmpfs that holds about three checkpoints;
the run stops when the disk fills. It lists what was left, verifies each file, then grows the
disk and resumes to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from animevq.runs.checkpoint_io import CheckpointError, verify_checkpoint
from animevq.runs.last import LAST_NAME, PREVIOUS_NAME

MODEL = {"latent_channels": 16, "encoder_channels": [8, 16, 16, 16], "decoder_channels": [16, 16, 16, 8],
         "num_res_blocks": 1, "num_embeddings": 16, "embedding_dim": 16, "use_lpips": False, "lambda_perc": 0.0,
         "log_every_n_steps": 1, "log_images_every_n_steps": 1000, "optimization": {"warmup_steps": 2}}


def _images(folder: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _config(path: Path, run_dir: Path, data: Path, epochs: int, workers: int) -> Path:
    config = {
        "run_dir": str(run_dir), "save_every_n_steps": 2,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": MODEL,
        "data": {"data_dir": str(data), "batch_size": 4, "image_size": 32, "val_split": 0.2,
                 "num_workers": workers},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "animevq.cli", "fit", "--config", str(config),
                                 "--ckpt_path", "last"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _check_folder(folder: Path) -> dict:
    """Verify every checkpoint in ``folder``; count temporaries left by a killed write."""
    files = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    bad = []
    for path in files:
        try:
            verify_checkpoint(path, previous_name=PREVIOUS_NAME)
        except CheckpointError as error:
            bad.append(f"{path.name}: {error}")
    temporaries = sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []
    return {"files": len(files), "bad": bad, "temporaries": temporaries}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def kill_loop(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    data = _images(out / "images")
    rng = random.Random(args.seed)
    reference = out / "reference"
    subprocess.run([sys.executable, "-m", "animevq.cli", "fit", "--config",
                    str(_config(out / "reference.yaml", reference, data, args.epochs, 1))],
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    expected = _weights(reference / "checkpoints" / LAST_NAME)
    per_run = -(-args.kills // args.runs)
    totals = {"kills": 0, "kills_with_a_temporary_left": 0, "checkpoint_files_verified": 0,
              "checkpoints_that_failed_to_verify": [], "resumes": 0, "resumes_that_failed": 0,
              "runs_finished": 0, "runs_identical_to_uninterrupted": 0, "runs": args.runs,
              "last_ckpt_batch_after_each_kill": []}
    for run in range(args.runs):
        run_dir = out / f"run{run}"
        config = _config(out / f"run{run}.yaml", run_dir, data, args.epochs, 1)
        log = out / f"run{run}.log"
        for _ in range(per_run):
            started = time.time()
            process = _start(config, log)
            if rng.random() < args.during_startup:
                time.sleep(rng.uniform(0.5, args.max_s))  # anywhere: start-up, restore, training
            else:  # in training: after the first save of this start, then up to max_s more
                last = run_dir / "checkpoints" / LAST_NAME
                while process.poll() is None and not (last.is_file() and last.stat().st_mtime > started):
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, args.max_s))
            if process.poll() is not None:  # finished (or failed) before the kill
                totals["resumes_that_failed"] += process.returncode != 0
                break
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            totals["kills"] += 1
            state = _check_folder(run_dir / "checkpoints")
            totals["checkpoint_files_verified"] += state["files"]
            totals["checkpoints_that_failed_to_verify"] += state["bad"]
            totals["kills_with_a_temporary_left"] += bool(state["temporaries"])
            last = run_dir / "checkpoints" / LAST_NAME
            batch = torch.load(last, weights_only=True)["animevq"]["batches_seen"] if last.is_file() else None
            totals["last_ckpt_batch_after_each_kill"].append(batch)
        final = _start(config, log)
        totals["resumes"] += 1
        totals["resumes_that_failed"] += final.wait() != 0
        last = run_dir / "checkpoints" / LAST_NAME
        if final.returncode == 0 and last.is_file():
            totals["runs_finished"] += 1
            weights = _weights(last)
            same = weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
            totals["runs_identical_to_uninterrupted"] += same
        totals["temporaries_left_at_the_end"] = _check_folder(run_dir / "checkpoints")["temporaries"]
    return totals


def full_disk(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    data = _images(out / "images")
    run_dir = out / "run"
    disk = run_dir / "checkpoints"
    disk.mkdir(parents=True, exist_ok=True)
    size = int(args.checkpoints * args.checkpoint_bytes)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        config = _config(out / "fit.yaml", run_dir, data, args.epochs, 0)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "animevq.cli", "fit", "--config", str(config), "--ckpt_path", "last"]
        first = subprocess.run(command, capture_output=True, text=True, env=env)
        error = [line for line in first.stderr.splitlines() if "could not write checkpoint" in line]
        left = {p.name: p.stat().st_size for p in sorted(disk.iterdir())}
        state = _check_folder(disk)
        if not (disk / LAST_NAME).is_file():
            return {"first_exit": first.returncode, "stderr": first.stderr[-3000:], "left_on_disk": left}
        batches = torch.load(disk / LAST_NAME, weights_only=True)["animevq"]["batches_seen"]
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(disk)], check=True)
        second = subprocess.run(command, capture_output=True, text=True, env=env)
        final = torch.load(disk / LAST_NAME, weights_only=True)["animevq"]["batches_seen"]
        return {"disk_bytes": size, "first_exit": first.returncode, "error": error[-1] if error else None,
                "left_on_disk": left, "bad": state["bad"], "temporaries": state["temporaries"],
                "last_ckpt_batches": batches, "resumed_exit": second.returncode, "final_batches": final}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    kill = sub.add_parser("kill-loop")
    kill.add_argument("--kills", type=int, default=24)
    kill.add_argument("--runs", type=int, default=3)
    kill.add_argument("--epochs", type=int, default=6)
    kill.add_argument("--max_s", type=float, default=3.0, help="longest wait before a kill (see --during_startup)")
    kill.add_argument("--during_startup", type=float, default=0.25,
                      help="share of kills at a random moment from the start; the others come after the first "
                      "save of that start (in training)")
    kill.add_argument("--seed", type=int, default=0)
    kill.add_argument("--out", required=True)
    disk = sub.add_parser("full-disk")
    disk.add_argument("--epochs", type=int, default=6)
    disk.add_argument("--checkpoints", type=float, default=3.5, help="disk size in checkpoints")
    disk.add_argument("--checkpoint_bytes", type=int, default=920_000)
    disk.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    result = kill_loop(args) if args.figure == "kill-loop" else full_disk(args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
