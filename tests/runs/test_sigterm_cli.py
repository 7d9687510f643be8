"""Reliability promises checked through `animevq fit` as a user runs it: bad image files
and an unwritable SwanLab folder don't stop training; a failure on one DDP rank ends every
rank quickly with the original error shown; checkpoints hold only tensors and plain values."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from clirun import fit_config, make_images, run_animevq
from plain import assert_plain
from poison import BAD_FILES, write_bad, write_good

from animevq.runs.sigterm import EXIT_SIGTERM

LISTING_REASONS = {"broken_link", "outside_data_dir"}  # refused while listing, never loaded


@pytest.fixture(scope="module")
def poisoned_fit(tmp_path_factory) -> dict:
    """One fit on a folder of good and bad files, with SwanLab's folder under a regular file."""
    tmp = tmp_path_factory.mktemp("poisoned")
    data = make_images(tmp / "images", n=12)
    write_good(data)
    write_bad(data, tmp / "elsewhere")
    blocker = tmp / "a_file"
    blocker.write_text("SwanLab cannot create folders under a file")
    logger = {"class_path": "animevq.SwanLabLogger",
              "init_args": {"project": "reliability", "mode": "local", "log_dir": str(blocker / "swanlog")}}
    config = fit_config(tmp / "run", data, logger=logger)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", str(tmp / "config.yaml"), cwd=tmp, timeout=150)
    return {"result": result, "run_dir": tmp / "run"}


@pytest.mark.timeout(200)
def test_fit_on_bad_files_completes_and_reports_each_reason(poisoned_fit: dict) -> None:
    result = poisoned_fit["result"]
    assert result.returncode == 0, result.stderr[-4000:]
    loaded_bad = {name: reason for name, reason in BAD_FILES.items() if reason not in LISTING_REASONS}
    epoch = [line for line in result.stderr.splitlines() if "files this epoch" in line]
    assert len(epoch) == 1 and f"skipped {len(loaded_bad)} files this epoch" in epoch[0]
    assert all(f"1 {reason} ({name})" in epoch[0] for name, reason in loaded_bad.items())
    listing = [line for line in result.stderr.splitlines() if "while listing data_dir" in line]
    assert listing and all(reason in listing[0] for reason in LISTING_REASONS)
    assert (poisoned_fit["run_dir"] / "checkpoints" / "last.ckpt").exists()


@pytest.mark.timeout(200)
def test_unwritable_swanlab_folder_falls_back_to_csv_in_the_run_folder(poisoned_fit: dict) -> None:
    result, run_dir = poisoned_fit["result"], poisoned_fit["run_dir"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SwanLab tracking disabled" in result.stderr and "a_file" in result.stderr
    batches = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["animevq"]["batches_seen"]
    with open(run_dir / "metrics" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["key"] == "train/total_loss"]
    assert batches > 0 and [int(row["step"]) for row in rows] == list(range(1, batches + 1))  # every batch
    assert all(torch.isfinite(torch.tensor(float(row["value"]))) for row in rows)


@pytest.mark.timeout(200)
def test_cli_checkpoints_hold_only_tensors_and_plain_values(poisoned_fit: dict) -> None:
    # VQ-GAN: tests/test_reliability.py::test_vqgan_checkpoint_holds_only_tensors_and_plain_values.
    checkpoints = sorted((poisoned_fit["run_dir"] / "checkpoints").glob("*.ckpt"))
    assert {"last.ckpt"} < {p.name for p in checkpoints} and any(p.name.startswith("best-") for p in checkpoints)
    for path in checkpoints:
        saved = torch.load(path, weights_only=True)
        assert_plain(saved, path.name)
    assert "rng" in saved["callbacks"]["ExactResume"]


@pytest.mark.timeout(120)
def test_ddp_ranks_skip_nonfinite_steps_together_and_an_exception_on_one_ends_all(tmp_path: Path) -> None:
    data = make_images(tmp_path / "images", n=16)
    nan = {"class_path": "reliability_callbacks.NanOnRank", "init_args": {"rank": 1, "batch": 1}}
    fail = {"class_path": "reliability_callbacks.RaiseOnRank", "init_args": {"rank": 1, "batch": 2}}
    config = fit_config(tmp_path / "run", data, devices=2, strategy="ddp", max_epochs=2, logger=False,
                     callbacks=[nan, fail])
    config["data"]["batch_size"] = 2
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", str(tmp_path / "ddp.yaml"), cwd=tmp_path, timeout=90)
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at batch 2" in result.stderr
    assert result.seconds < 60 and result.leftover == []  # rank 0 noticed and nothing hangs on
    # Before that, rank 1's NaN batch was skipped by both ranks (rank 0 logs it; its own loss
    # was finite), or rank 0 would have waited in a gradient all-reduce rank 1 never joined.
    assert "non-finite loss at batch 1 (1 in a row, 1 in all): step skipped" in result.stderr


@pytest.mark.timeout(120)
def test_ddp_checkpoint_write_failing_on_rank_0_ends_every_rank_and_keeps_the_last_one(tmp_path: Path) -> None:
    # Rank 0 writes last.ckpt. When its write failed (a full disk), rank 1 used to wait for it in
    # Trainer.save_checkpoint's barrier: over gloo it then failed with gloo's "remote worker crashing"
    # once rank 0 exited; over NCCL it waited for the process group's timeout (tests/gpu).
    data = make_images(tmp_path / "images", n=16)
    full = {"class_path": "reliability_callbacks.DiskFullOnRank", "init_args": {"rank": 0, "batch": 2}}
    config = fit_config(tmp_path / "run", data, devices=2, strategy="ddp", max_epochs=3, logger=False, callbacks=[full])
    config["data"]["batch_size"] = 2
    config["save_every_n_steps"] = 2
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", str(tmp_path / "ddp.yaml"), cwd=tmp_path, timeout=90)
    assert result.returncode != 0
    assert "No space left on device (injected on rank 0)" in result.stderr
    assert "animevq fit: error: another rank failed while writing" in result.stderr  # rank 1's own, one line
    assert result.seconds < 60 and result.leftover == []
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["animevq"]["batches_seen"] == 2
    assert not list(checkpoints.glob(".*.tmp"))


def _sigterm_run(tmp_path: Path, callbacks: list[dict], devices: int = 2, num_workers: int = 0):
    """A 3-epoch fit on 16 images (batch 2) with ``callbacks``; returns the CLI's result,
    the sorted ``rank batches_seen exception`` rows of each rank that stopped on an
    exception, and ``last.ckpt``."""
    data = make_images(tmp_path / "images", n=16)
    stops = tmp_path / "stops.txt"
    ddp = {"devices": 2, "strategy": "ddp"} if devices == 2 else {}
    config = fit_config(tmp_path / "run", data, max_epochs=3, logger=False, **ddp,
                     callbacks=[*callbacks, {"class_path": "reliability_callbacks.StopRecorder",
                                             "init_args": {"path": str(stops)}}])
    config["data"].update(batch_size=2, num_workers=num_workers)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", str(tmp_path / "fit.yaml"), cwd=tmp_path, timeout=90)
    rows = sorted(line.split() for line in stops.read_text().splitlines()) if stops.exists() else []
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return result, rows, last


@pytest.mark.timeout(120)
def test_ddp_sigterm_on_every_rank_saves_the_batch_and_stops_every_rank(tmp_path: Path) -> None:
    # As torchrun and SLURM send it: every rank receives the signal during batch 4 (epoch 1).
    stop = {"class_path": "reliability_callbacks.SigtermAt", "init_args": {"batch": 4}}
    result, rows, last = _sigterm_run(tmp_path, [stop])
    assert result.returncode == EXIT_SIGTERM, result.stderr[-4000:]
    assert "stopped by SIGTERM" in result.stderr
    assert result.seconds < 60 and result.leftover == []
    assert last["animevq"]["batches_seen"] == 5  # batch 4 was finished, then saved by both ranks together
    assert rows == [["0", "5", "AgreedSigterm"], ["1", "5", "AgreedSigterm"]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "flag", "epoch"), [
    # As epoch 1 starts: HostSigtermCheck's agreement before the batch stops both ranks.
    # Lightning's own check asked rank 0 only, so rank 0 would go on while rank 1 stopped after
    # the batch, leaving rank 0 in a collective alone. The checkpoint is epoch 0's.
    ("between_batches", "SigtermFlagOnRank", 1),
    # At epoch 0's first validation batch: Lightning's evaluation loop would stop rank 1 there
    # and leave rank 0 validating alone. Both stop after that batch; LastCheckpoint saves then.
    ("during_validation", "SigtermFlagInValidation", 0),
])
def test_ddp_sigterm_on_one_rank_stops_every_rank_at_the_same_point(tmp_path: Path, where: str, flag: str,
                                                                     epoch: int) -> None:
    record = {"class_path": f"reliability_callbacks.{flag}", "init_args": {"rank": 1, "epoch": epoch}}
    result, rows, last = _sigterm_run(tmp_path, [record])
    assert result.returncode == EXIT_SIGTERM, result.stderr[-4000:]
    assert result.seconds < 60 and result.leftover == []
    per_epoch = last["animevq"]["batches_seen"]  # all of epoch 0 trained, nothing after it
    assert per_epoch == last["global_step"] > 0
    assert rows == [["0", str(per_epoch), "AgreedSigterm"], ["1", str(per_epoch), "AgreedSigterm"]]


@pytest.mark.timeout(120)
def test_ddp_sigterm_after_the_agreement_of_a_batch_waits_for_the_next_one(tmp_path: Path) -> None:
    # Rank 1 alone is signalled after HostSigtermCheck's check at the end of batch 3 and
    # before Lightning's own test of its flag. Lightning would stop rank 1 there alone; the
    # signal is recorded where only the agreements see it, so both ranks stop before batch 4.
    kill = {"class_path": "reliability_callbacks.SigtermAfterBatch", "init_args": {"rank": 1, "batch": 3}}
    result, rows, last = _sigterm_run(tmp_path, [kill])
    assert result.returncode == EXIT_SIGTERM, result.stderr[-4000:]
    assert result.seconds < 60 and result.leftover == []
    assert last["animevq"]["batches_seen"] == 4
    assert rows == [["0", "4", "AgreedSigterm"], ["1", "4", "AgreedSigterm"]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("devices", [1, 2])
def test_sigterm_to_the_whole_process_group_with_loader_workers_saves_and_exits_143(tmp_path: Path,
                                                                                     devices: int) -> None:
    # `timeout`, `kill -TERM -PGID` and schedulers signal the DataLoader workers too. A worker
    # that died of it used to end the run with "DataLoader worker exited unexpectedly"
    # (status 1, no checkpoint); workers now obey SIGTERM from their training process only.
    kill = {"class_path": "reliability_callbacks.SigtermGroupAt", "init_args": {"batch": 4}}
    result, rows, last = _sigterm_run(tmp_path, [kill], devices=devices, num_workers=2)
    assert result.returncode == EXIT_SIGTERM, result.stderr[-4000:]
    assert "exited unexpectedly" not in result.stderr and "killed by signal" not in result.stderr
    assert result.seconds < 60 and result.leftover == []  # the workers ended with their training process
    assert last["animevq"]["batches_seen"] == 5  # the batch being trained was finished, then saved
    assert [row[:2] for row in rows] == [[str(rank), "5"] for rank in range(devices)]
