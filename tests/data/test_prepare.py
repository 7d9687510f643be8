"""``animevq prepare`` writes a LitData dataset: what is stored and reported, that LitData
opens it directly, resuming an interrupted run, and the command's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import litdata
import numpy as np
import pytest
from PIL import Image

from animevq.data import PrepareOptions, crop_resize, load_image, prepare_folder, read_info
from animevq.data.transforms import stored_image
from animevq.tools.prepare import main

S = 16
GOOD = {  # name → (width, height): square, landscape, portrait, past max_aspect, large
    "square.png": (24, 24), "wide.png": (40, 20), "sub/tall.png": (20, 52),
    "strip.png": (100, 16), "big.png": (210, 130), "photo.jpg": (48, 36), "odd.png": (37, 23),
}
BAD = {"cut.png": "truncated", "empty.png": "empty", "text.jpg": "not_an_image",
       "tiny.png": "too_small", "dangling.png": "broken_link"}


def _noise(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def make_source(root: Path, bad: bool = True) -> Path:
    for seed, (name, size) in enumerate(GOOD.items()):
        _noise(root / name, size, seed)
    if bad:
        _noise(root / "cut.png", (64, 64), 99)
        (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:2000])
        (root / "empty.png").write_bytes(b"")
        (root / "text.jpg").write_text("<html>not found</html>")
        _noise(root / "tiny.png", (4, 30), 7)
        os.symlink("nowhere.png", root / "dangling.png")
    return root


class Prepared(NamedTuple):
    src: Path
    dst: Path
    out: str  # what `animevq prepare` printed


@pytest.fixture
def prepared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Prepared:
    src, dst = make_source(tmp_path / "src"), tmp_path / "dst"
    args = ["prepare", str(src), str(dst), "--size", str(S), "--workers", "2", "--no_progress"]
    assert main(args) == 0
    return Prepared(src, dst, capsys.readouterr().out)


def test_one_litdata_item_per_good_image_and_bad_files_reported(prepared: Prepared) -> None:
    src, dst, out = prepared
    assert f"prepared {len(GOOD)} images" in out and "1 truncated (cut.png)" in out
    assert sorted(os.listdir(dst.parent)) == ["dst", "src"]  # no .tmp left behind
    info = read_info(dst)
    assert info is not None and (info.size, info.num_images, info.source) == (S, len(GOOD), str(src))
    assert {item.path: item.reason for item in info.skipped} == BAD
    assert {item.path for item in info.skipped if item.stage == "listing"} == {"dangling.png"}
    stream = litdata.StreamingDataset(str(dst))  # a real LitData dataset, opened directly
    assert len(stream) == len(GOOD)
    items = [stream[i] for i in range(len(stream))]
    # Every good image once, as stored_image makes it from a fresh decode.
    expected = {name: stored_image(load_image(src / name, target_size=S), S, 2.0) for name in GOOD}
    for name, pixels in expected.items():
        matches = [item for item in items if item.shape == pixels.shape and np.array_equal(item, pixels)]
        assert len(matches) == 1, name
    for item in items:
        assert item.dtype == np.uint8 and min(item.shape[:2]) == S and max(item.shape[:2]) <= 2 * S


@pytest.mark.parametrize("width,height,size", [
    (24, 24, 16), (37, 23, 16), (23, 61, 16), (61, 23, 12), (130, 500, 8), (500, 131, 8),
    (300, 90, 24), (9, 90, 16), (90, 9, 32),
])
def test_centre_of_a_stored_image_is_the_raw_validation_crop(width: int, height: int, size: int) -> None:
    """Portrait and landscape, up- and downscaled, with Pillow's pre-reduction (>= 6x),
    past max_aspect: the stored image's centre crop is crop_resize's, to a level."""
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    stored = stored_image(image, size, max_aspect=2.0)  # (H',W',3)
    short, long = sorted(stored.shape[:2])
    assert short == size and long <= 2 * size and (long - size) % 2 == 0
    top, left = (stored.shape[0] - size) // 2, (stored.shape[1] - size) // 2
    ours = stored[top : top + size, left : left + size].astype(int)
    theirs = np.asarray(crop_resize(image, size)).astype(int)
    assert np.abs(ours - theirs).max() <= 1 and (ours == theirs).mean() > 0.99


def _many(root: Path, count: int) -> Path:
    for i in range(count):
        _noise(root / f"{i:03d}.png", (24 + i % 5, 16 + i % 3), i)
    (root / "zz-empty.png").write_bytes(b"")
    return root


def _items(dst: Path) -> list[bytes]:
    stream = litdata.StreamingDataset(str(dst))
    return [stream[i].tobytes() for i in range(len(stream))]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_interrupted_run_continues_and_equals_a_fresh_one(tmp_path: Path) -> None:
    """SIGINT to a real `animevq prepare` in the middle: the same command finishes the job
    without redoing the chunks written, and gives a fresh run's dataset, bad file included."""
    src = _many(tmp_path / "src", 150)
    command = [sys.executable, "-m", "animevq", "prepare", str(src), "", "--size", str(S),
               "--workers", "1", "--chunk_size_mb", str(4 * S * 2 * S * 3 / 2**20), "--no_progress"]
    dst, fresh = tmp_path / "dst", tmp_path / "fresh"
    run = subprocess.Popen([*command[:5], str(dst), *command[6:]], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    chunks = tmp_path / "dst.tmp" / "data"
    deadline = time.monotonic() + 120
    while len(list(chunks.glob("chunk-*.bin"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode != 0 and not dst.exists(), err[-2000:]
    assert "run the same command again to resume" in err
    again = subprocess.run([*command[:5], str(dst), *command[6:]], capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing an interrupted run" in again.stdout
    done = subprocess.run([*command[:5], str(fresh), *command[6:]], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _items(dst) == _items(fresh) and len(_items(dst)) == 150
    assert read_info(dst).skipped == read_info(fresh).skipped and len(read_info(dst).skipped) == 1


def test_command_line_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(*args: str) -> str:
        assert main(["prepare", *args, "--size", str(S), "--workers", "1", "--no_progress"]) == 1
        return capsys.readouterr().err

    src = make_source(tmp_path / "src", bad=False)
    assert "SRC " + str(tmp_path / "nowhere") + " does not exist" in fails(
        str(tmp_path / "nowhere"), str(tmp_path / "a"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("no images")
    assert "holds no images" in fails(str(tmp_path / "notes"), str(tmp_path / "b"))
    assert "not a prepared dataset" in fails(str(src), str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "x.txt").exists()  # untouched
    assert "is a file" in fails(str(src), str(tmp_path / "notes" / "x.txt"))
    assert "cannot write" in fails(str(src), str(tmp_path / "notes" / "x.txt" / "under_a_file"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    assert "none of the 1 image files" in fails(str(bad), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()

    dst = tmp_path / "dst"
    assert main(["prepare", str(src), str(dst), "--size", str(S), "--no_progress"]) == 0
    assert main(["prepare", str(src), str(dst), "--size", str(S), "--no_progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert "--overwrite" in fails(str(src), str(dst), "--max_aspect", "1.5")
    assert main(["prepare", str(src), str(dst), "--size", str(S + 4), "--overwrite", "--no_progress"]) == 0
    assert read_info(dst).size == S + 4 and not (tmp_path / "dst.old").exists()
    info = json.loads((dst / "animevq.json").read_text())
    info["version"] = 99
    (dst / "animevq.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="newer animevq"):
        read_info(dst)
    (dst / "animevq.json").write_text(json.dumps({**info, "version": 1, "skipped": [{"path": 3}]}))
    with pytest.raises(ValueError, match=r"animevq.json: skipped must list .*re-run `animevq prepare"):
        read_info(dst)


def test_options_are_recorded_and_a_smaller_size_differs(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", bad=False)
    options = PrepareOptions(size=S // 2, max_aspect=1.5)
    result = prepare_folder(src, tmp_path / "dst", options, workers=1, progress=False)
    assert result.num_images == len(GOOD) and not result.already_prepared
    info = read_info(tmp_path / "dst")
    assert info.options["max_aspect"] == 1.5 and info.size == S // 2
    for i in range(len(GOOD)):
        item = litdata.StreamingDataset(str(tmp_path / "dst"))[i]
        assert min(item.shape[:2]) == S // 2 and max(item.shape[:2]) <= 1.5 * S // 2
