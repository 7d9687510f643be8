"""Run `python -m animevq.cli` as a user would, with a hard time limit that also ends the
processes it started (DDP launches its other ranks as children)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import yaml_model
from PIL import Image

TESTS = Path(__file__).resolve().parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    leftover: list[int]  # processes of its group still running when it exited

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_animevq(*args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in its own process group; on timeout kill that group and fail."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    full_env.pop("SWANLAB_LOG_DIR", None)
    full_env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only wait on a busy machine
    full_env.update(env or {})
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "animevq.cli", *args], cwd=cwd, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the group we started: rank 0 and its children
        stdout, stderr = process.communicate()
        raise AssertionError(f"animevq {' '.join(args)} ran past {timeout} s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    seconds = time.perf_counter() - start
    time.sleep(0.5)  # a rank that is exiting on its own gets the time to finish
    leftover = _live_members(process.pid)
    for pid in leftover:  # ours: started in this process group
        os.kill(pid, signal.SIGKILL)
    return Result(process.returncode, stdout, stderr, seconds, leftover)


def _live_members(pgid: int) -> list[int]:
    """Running (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def make_images(folder: Path, n: int = 24, size: int = 40) -> Path:
    """``n`` distinct PNGs larger than the 32 px crops, so random crops differ."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = rng.integers(0, 255, (size, size + 8 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return folder


def fit_config(run_dir: Path, data: Path, **trainer) -> dict:
    """A one-epoch CPU ``animevq fit`` config of the tiny model on ``data``; ``trainer`` adds to its trainer."""
    return {
        "run_dir": str(run_dir),
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, **trainer},
        "model": yaml_model(lambda_perc=0.0, optimization={"warmup_steps": 2}, log_every_n_steps=1,
                            log_images_every_n_steps=1000),
        "data": {"data_dir": str(data), "batch_size": 4, "image_size": 32, "val_split": 0.25, "num_workers": 0,
                 "drop_last": False},  # every file is tried in the one epoch
    }
