"""A prepared folder is untrusted input: a damaged index row is skipped and reported like a
bad file, in workers too; a malformed index, path list or manifest is refused when the
folder is opened, naming the file and the way out."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import AnimeDataModule, DataReport, PrepareOptions, prepare_folder
from conftest import tiny_trainer
from probe import Probe

S = 16
GOOD = 8  # stored images
DAMAGE = {  # row → what is written into it (shard, offset, height, width; None: keep)
    1: (None, "past the end", None, None),  # starts where its shard ends
    3: (7, None, None, None),  # a shard that does not exist
    4: (None, None, 10**15, None),  # garbage that would overflow height*width*3
    6: (None, -S * S * 3, None, None),  # before the shard's start
}


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A folder written by the real prepare code: GOOD noise images, all in one shard."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        size = (S + 2 * i, S)  # landscape, stored at short side S
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            src / f"img{i}.png")
    dst = tmp_path / "prepared"
    prepare_folder(src, dst, PrepareOptions(size=S), workers=1, progress=False)
    return dst


def _damage(dst: Path) -> list[str]:
    """Write DAMAGE into index.npy on disk; returns the damaged rows' source paths."""
    index = np.load(dst / "index.npy")
    shard_bytes = (dst / "shard-00000.bin").stat().st_size
    for row, values in DAMAGE.items():
        for column, value in enumerate(values):
            if value == "past the end":
                value = shard_bytes
            if value is not None:
                index[row, column] = value
    np.save(dst / "index.npy", index)
    paths = json.loads((dst / "paths.json").read_text())
    return [paths[row] for row in DAMAGE]


def test_damaged_rows_are_skipped_and_reported_each_epoch_in_workers(
    prepared: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """was: the first damaged row raised in a DataLoader worker and stopped the fit."""
    damaged = _damage(prepared)
    dm = AnimeDataModule(str(prepared), batch_size=2, val_split=0.0, image_size=S,
                         num_workers=2, drop_last=False)
    probe, report = Probe(), DataReport()
    trainer = tiny_trainer(max_epochs=2, callbacks=[report], num_sanity_val_steps=0,
                           limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="animevq.data"):
        trainer.fit(probe, datamodule=dm)
    assert probe.shapes == [(2, 3, S, S)] * (2 * GOOD // 2)  # every batch full, both epochs
    [opened] = [r.message for r in caplog.records if "damaged row" in r.message]
    assert str(prepared / "index.npy") in opened and "animevq prepare" in opened
    assert f"{len(DAMAGE)} damaged row(s)" in opened
    assert "row 1 ('img1.png')" in opened and "shard 7 does not exist" in opened
    epochs = [r.message for r in caplog.records if "this epoch" in r.message]
    assert len(epochs) == 2
    for message in epochs:
        assert f"{len(DAMAGE)} bad_index_row (" in message
    assert report.last_report.counts == {"bad_index_row": len(DAMAGE)}
    assert {path for path, _ in report.last_report.files} == set(damaged)
    assert dm.skipped == {"bad_index_row": len(DAMAGE)}
    assert float(trainer.callback_metrics["data/skipped_files"]) == len(DAMAGE)


def test_a_shard_cut_after_opening_is_checked_at_each_read(prepared: Path) -> None:
    dm = AnimeDataModule(str(prepared), batch_size=2, val_split=0.0, image_size=S, num_workers=0)
    dm.setup()
    shard = prepared / "shard-00000.bin"
    kept = shard.stat().st_size // 2
    shard.write_bytes(shard.read_bytes()[:kept])  # before any read maps it
    batch = torch.cat(list(dm.train_dataloader()))
    assert batch.shape == (GOOD, 3, S, S)
    index = dm.train_dataset.entries
    cut = int(((index[:, 1] + index[:, 2] * index[:, 3] * 3) > kept).sum())
    assert 0 < cut < GOOD and dm.skipped == {"bad_index_row": cut}


def _forged_header(path: Path, shape: tuple[int, ...]) -> None:
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "<i8", "fortran_order": False, "shape": shape})
        file.write(b"\0" * 64)


@pytest.mark.parametrize("damage,file", [
    ("garbage", "index.npy"), ("float rows", "index.npy"), ("three columns", "index.npy"),
    ("forged shape", "index.npy"), ("paths not a list", "paths.json"),
    ("shard name a number", "manifest.json"), ("unknown skip reason", "manifest.json"),
])
def test_a_malformed_folder_is_refused_naming_the_file(
    prepared: Path, damage: str, file: str
) -> None:
    """was: tracebacks from inside numpy or dict lookups, or 32 TB asked of the allocator."""
    index = np.load(prepared / "index.npy")
    manifest = json.loads((prepared / "manifest.json").read_text())
    if damage == "garbage":
        (prepared / file).write_bytes(b"\x93NUMPY garbage " * 7)
    elif damage == "float rows":
        np.save(prepared / file, index.astype(np.float64))
    elif damage == "three columns":
        np.save(prepared / file, index[:, :3])
    elif damage == "forged shape":
        _forged_header(prepared / file, (2**40, 4))
    elif damage == "paths not a list":
        (prepared / file).write_text(json.dumps({"img0.png": 0}))
    else:
        if damage == "shard name a number":
            manifest["shards"][0]["name"] = 5
        else:
            manifest["skipped"] = [{"path": "x.png", "reason": "cosmic_rays", "detail": "",
                                    "stage": "loading"}]
        (prepared / file).write_text(json.dumps(manifest))
    start = time.perf_counter()
    with pytest.raises(ValueError) as refused:
        AnimeDataModule(str(prepared), image_size=S).setup()
    assert time.perf_counter() - start < 2.0
    message = str(refused.value)
    assert str(prepared / file) in message and "animevq prepare" in message
    assert "\n" not in message
