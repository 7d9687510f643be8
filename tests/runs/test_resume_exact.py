"""SIGTERM at batch k, then `--ckpt_path last`: the run continues exactly as one that was
never stopped — same batches in the same order (shuffled, random crops), same weights and
weight EMA, optimizer and scheduler states, codebook buffers, counters and RNG streams.
Both for a folder of images (one worker) and for the LitData dataset `animevq prepare`
writes of it, streamed by two workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from clirun import make_images, run_animevq
from conftest import yaml_model

from animevq.data import PrepareOptions, prepare_folder
from animevq.runs.sigterm import EXIT_SIGTERM

# 24 images, about a quarter to validation: a folder splits by hash (17 train: 5 batches of 3),
# a LitData dataset by chunks (18 train, read by 2 workers that batch 9 each: 6 batches).
BATCHES_PER_EPOCH = {"folder": 5, "litdata": 6}
STOP_AT = 7  # SIGTERM arrives as the 8th batch (epoch 1) starts
WORKERS = {"folder": 1, "litdata": 2}


def _config(run_dir: Path, data: Path, callbacks: list[dict], workers: int) -> dict:
    return {
        "seed_everything": 0,
        "run_dir": str(run_dir),
        "save_every_n_steps": 4,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks},
        "model": yaml_model(lambda_perc=0.0, optimization={"warmup_steps": 2, "ema_decay": 0.9},
                            log_every_n_steps=1, log_images_every_n_steps=1000),
        "data": {"data_dir": str(data), "batch_size": 3, "image_size": 32, "val_split": 0.25, "num_workers": workers},
    }


def _fit(tmp: Path, name: str, data: Path, callbacks: list[dict], workers: int, *extra: str):
    run_dir = tmp / name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(run_dir, data, callbacks, workers)))
    return run_animevq("fit", "--config", str(path), *extra, cwd=tmp, timeout=150), run_dir


def _recorder(path: Path) -> dict:
    return {"class_path": "reliability_callbacks.Recorder", "init_args": {"path": str(path)}}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=["folder", "litdata"])
def runs(tmp_path_factory, request) -> dict:
    kind, tmp = request.param, tmp_path_factory.mktemp("resume")
    data = make_images(tmp / "images")
    if kind == "litdata":
        data = prepare_folder(data, tmp / "prepared", PrepareOptions(size=32), workers=1,
                              chunk_bytes=3 * 32 * 48 * 3, progress=False).dst
    workers = WORKERS[kind]
    straight, straight_dir = _fit(tmp, "straight", data, [_recorder(tmp / "straight.jsonl")], workers)
    assert straight.returncode == 0, straight.stderr[-4000:]
    stop = {"class_path": "reliability_callbacks.SigtermAt", "init_args": {"batch": STOP_AT}}
    stopped, stopped_dir = _fit(tmp, "stopped", data, [_recorder(tmp / "stopped.jsonl"), stop], workers)
    at_stop = torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # The same run folder and config, resumed (the SIGTERM callback is not passed again).
    config = yaml.safe_load((tmp / "stopped.yaml").read_text())
    config["trainer"]["callbacks"] = [_recorder(tmp / "stopped.jsonl")]
    (tmp / "stopped.yaml").write_text(yaml.safe_dump(config))
    resumed = run_animevq("fit", "--config", str(tmp / "stopped.yaml"), "--ckpt_path", "last", cwd=tmp, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"per_epoch": BATCHES_PER_EPOCH[kind], "tmp": tmp, "straight_dir": straight_dir, "stopped_dir": stopped_dir, "stopped": stopped,
            "at_stop": at_stop, "resumed": resumed}


@pytest.mark.timeout(400)
def test_sigterm_writes_a_checkpoint_and_exits_nonzero(runs: dict) -> None:
    stopped = runs["stopped"]
    assert stopped.returncode == EXIT_SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr
    at_stop = runs["at_stop"]
    # The batch during which the signal came was finished, then saved (not the cadence's 8).
    assert at_stop["animevq"]["batches_seen"] == STOP_AT + 1
    assert at_stop["global_step"] == STOP_AT + 1
    assert (runs["stopped_dir"] / "checkpoints" / "previous.ckpt").exists()


@pytest.mark.timeout(400)
def test_resumed_run_sees_the_same_batches_and_rng_draws(runs: dict) -> None:
    straight = _records(runs["tmp"] / "straight.jsonl")
    pieced = _records(runs["tmp"] / "stopped.jsonl")  # before the stop, then after the resume
    per_epoch = runs["per_epoch"]
    assert len(straight) == 3 * per_epoch
    assert [r["batches_seen"] for r in pieced] == list(range(3 * per_epoch))
    assert pieced[STOP_AT + 1]["epoch"] == 1 and pieced[STOP_AT + 1]["batch_idx"] == STOP_AT + 1 - per_epoch
    assert pieced == straight
    # Shuffling and crops are really on: the epochs differ.
    epochs = [[r["batch"] for r in straight if r["epoch"] == e] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]


def _assert_same(a, b, where: str = "checkpoint") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.timeout(400)
def test_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(runs: dict) -> None:
    straight = torch.load(runs["straight_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(runs["stopped_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert straight["animevq"]["batches_seen"] == 3 * runs["per_epoch"]
    assert any(k.startswith("tokenizer.quantizer.") for k in straight["state_dict"])
    assert int(straight["state_dict"]["tokenizer.quantizer.updates"]) == 3 * runs["per_epoch"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "animevq", "global_step", "epoch"):
        _assert_same(straight[key], resumed[key], key)
    rng = "ExactResume"
    _assert_same(straight["callbacks"][rng], resumed["callbacks"][rng], "rng")
    # And the resume really restored something: the state at the stop differs from the end.
    assert not torch.equal(runs["at_stop"]["state_dict"]["tokenizer.quantizer.embedding"],
                           straight["state_dict"]["tokenizer.quantizer.embedding"])
    # The weight EMA is in the compared state dict, lags the live weights and moved after the stop.
    state, at_stop = straight["state_dict"], runs["at_stop"]["state_dict"]
    key = next(k for k in state if k.startswith("tokenizer.decoder.") and k.endswith("weight"))[len("tokenizer."):]
    assert not torch.equal(state[f"ema_tokenizer.{key}"], state[f"tokenizer.{key}"])
    assert not torch.equal(state[f"ema_tokenizer.{key}"], at_stop[f"ema_tokenizer.{key}"])
