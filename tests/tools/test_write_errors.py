"""A tool that cannot write (a full disk, a name too long) says so in one line naming the path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from disks import small_disk
from PIL import Image

from animevq.cli import main as cli_main

FULL = "No space left on device; free some space or choose another --out"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The tool's stderr, after checking it failed with status 1 and printed one line."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def test_every_tool_names_the_path_when_the_disk_is_full(ckpt: Path, images: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Was: "[Errno 28] No space left on device" naming no path, and a traceback from export.
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):  # incompressible, so their PNGs fill the disk
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), np.uint8)).save(big / f"{i}.png")
    tokens = tmp_path / "tokens"
    with pytest.raises(SystemExit) as ok:
        cli_main(["encode", "--ckpt", str(ckpt), "--data_dir", str(big), "--image_size", "64", "--out", str(tokens),
                  "--num_workers", "0", "--quiet"])
    assert ok.value.code == 0
    capsys.readouterr()
    common = ["--image_size", "64", "--num_workers", "0", "--quiet"]
    with small_disk(tmp_path / "disk", 12 * 1024) as disk:
        commands = {
            "export": ["export", "--ckpt", str(ckpt), "--out", str(disk / "export")],
            "reconstruct": ["reconstruct", "--ckpt", str(ckpt), "--input", str(big), "--out", str(disk / "rec"), *common],
            "decode": ["decode", "--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(disk / "dec"), "--quiet"],
            "evaluate": ["evaluate", "--ckpt", str(ckpt), "--data_dir", str(big), "--out", str(disk / "eval"), "--no_fid",
                         *common],
            "prepare": ["prepare", str(big), str(disk / "prep"), "--size", "64", "--no_progress"],
        }
        for name, argv in commands.items():
            err = _run(capsys, *argv)
            assert err.startswith(f"animevq {name}: error: cannot write {disk}") and err.endswith(FULL), err
            assert not list(disk.rglob(".*.tmp")), f"{name} left a temporary file"
            for folder in disk.iterdir():  # room for the next tool
                shutil.rmtree(folder)


def test_a_file_name_too_long_names_the_file(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two sources with one stem keep their extensions in the output names: 250 + 8 > 255 bytes.
    folder = tmp_path / "long"
    folder.mkdir()
    stem = "a" * 250
    for extension in ("jpg", "webp"):
        Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / f"{stem}.{extension}")
    out = tmp_path / "rec"
    err = _run(capsys, "reconstruct", "--ckpt", str(ckpt), "--input", str(folder), "--out", str(out),
               "--image_size", "32", "--num_workers", "0", "--quiet")
    assert err.startswith(f"animevq reconstruct: error: cannot write {out}/{stem}.") and ".png: File name too long; " \
        "choose a shorter --out, or give the inputs shorter names" in err, err


def test_an_output_name_that_fits_is_written_though_its_temporary_name_would_not(
        ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 251 + ".png" = 255 bytes: the longest name ext4 allows; ".<name>.tmp" would be 260.
    folder = tmp_path / "long"
    folder.mkdir()
    stem = "b" * 251
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / f"{stem}.jpg")
    out = tmp_path / "rec"
    with pytest.raises(SystemExit) as ok:
        cli_main(["reconstruct", "--ckpt", str(ckpt), "--input", str(folder), "--out", str(out),
                  "--image_size", "32", "--num_workers", "0", "--quiet"])
    assert ok.value.code == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [f"{stem}.png"]
    assert Image.open(out / f"{stem}.png").size == (32, 32)
