"""One fit per run folder (a lock that names its holder and survives its holder's death only as a
stale file), and a run whose last.ckpt is gone resumes from previous.ckpt instead of starting over."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from clirun import fit_config, make_images

from animevq.cli import main as cli_main
from animevq.runs.lock import LOCK_NAME, RunFolderBusy, RunFolderLock

HOLD = ("import sys, time\nfrom animevq.runs.lock import RunFolderLock\n"
        "lock = RunFolderLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)\n")


def _config(tmp_path: Path, **trainer) -> Path:
    config = fit_config(tmp_path / "run", make_images(tmp_path / "images", n=12), logger=False, **trainer)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_second_fit_on_a_folder_in_use_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(RunFolderBusy, match=rf"run folder .*run is in use by PID {holder.pid} on "):
            cli_main(["fit", "--config", str(config)])
        assert time.perf_counter() - start < 60
        written = sorted(p.name for p in (tmp_path / "run").rglob("*"))
        assert written == [LOCK_NAME]  # no config.yaml, no checkpoint: nothing of the second fit
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: its lock file stays, its flock goes with it
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="animevq.runs.lock"):
        cli_main(["fit", "--config", str(_config(tmp_path))])
    assert f"stale lock in {tmp_path / 'run'} left by PID {holder.pid}" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at the end of the fit


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    first, second = RunFolderLock(tmp_path), RunFolderLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunFolderBusy):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_a_lone_previous_checkpoint_is_resumed_not_overwritten(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path)
    cli_main(["fit", "--config", str(config)])
    checkpoints = tmp_path / "run" / "checkpoints"
    first = torch.load(checkpoints / "last.ckpt", weights_only=True)
    (checkpoints / "previous.ckpt").unlink(missing_ok=True)
    (checkpoints / "last.ckpt").rename(checkpoints / "previous.ckpt")  # died between the two renames of a save
    with caplog.at_level(logging.WARNING, logger="animevq.cli"):
        cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert "last.ckpt is missing; resuming from" in caplog.text and "previous.ckpt" in caplog.text
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert resumed["animevq"]["batches_seen"] == 2 * first["animevq"]["batches_seen"]  # continued, not restarted
    kept = torch.load(checkpoints / "previous.ckpt", weights_only=True)
    assert kept["animevq"]["batches_seen"] == first["animevq"]["batches_seen"]
