"""``animevq prepare`` and prepared folders: what is stored and reported, that
AnimeDataModule reads a prepared folder exactly like its source folder, resuming, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import (
    AnimeDataModule,
    PrepareOptions,
    SampleKey,
    crop_resize,
    prepare_folder,
    read_prepared,
)
from animevq.data import prepare as prepare_module
from animevq.tools.prepare import main
from animevq.data.prepared import stored_image

S = 16
LEVEL = 1 / 127.5  # one 8-bit level in [-1,1]
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


def _source(root: Path, bad: bool = True) -> Path:
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
    src, dst = _source(tmp_path / "src"), tmp_path / "dst"
    args = ["prepare", str(src), str(dst), "--size", str(S), "--workers", "2", "--no_progress"]
    assert main(args) == 0
    return Prepared(src, dst, capsys.readouterr().out)


def test_stores_each_image_at_the_size_and_reports_bad_files(prepared: Prepared) -> None:
    src, dst, out = prepared
    assert f"prepared {len(GOOD)} images" in out and "1 truncated (cut.png)" in out
    assert sorted(os.listdir(dst.parent)) == ["dst", "src"]  # no .tmp left behind
    folder = read_prepared(dst)
    manifest = folder.manifest
    assert (manifest["format"], manifest["version"], manifest["size"]) == ("animevq-prepared", 1, S)
    assert manifest["num_images"] == len(GOOD) and folder.paths == sorted(GOOD)
    assert {item.path: item.reason for item in folder.skipped} == BAD
    assert manifest["skipped_counts"] == {reason: 1 for reason in BAD.values()}
    assert {item.path for item in folder.skipped if item.stage == "listing"} == {"dangling.png"}
    assert not (dst / "journal.jsonl").exists()
    for path, (shard, offset, height, width) in zip(folder.paths, folder.index):
        w, h = GOOD[path]
        short, long = sorted((height, width))
        expected_long = min(max(w, h) * S / min(w, h), 2 * S)  # short side S, aspect kept
        assert short == S and (height > width) == (h > w)
        assert expected_long - 2 < long <= expected_long and (long - S) % 2 == 0
    # The bytes are the pixels: a shard slice is exactly what a fresh decode gives.
    square = folder.index[folder.paths.index("square.png")]
    shard = np.fromfile(dst / "shard-00000.bin", dtype=np.uint8)
    stored = shard[square[1] : square[1] + S * S * 3].reshape(S, S, 3)
    expected = Image.open(src / "square.png").resize((S, S), Image.Resampling.BICUBIC)
    assert np.abs(stored.astype(int) - np.asarray(expected).astype(int)).max() <= 1


@pytest.mark.parametrize("width,height,size", [
    (24, 24, 16), (37, 23, 16), (23, 61, 16), (61, 23, 12), (130, 500, 8), (500, 131, 8),
    (300, 90, 24), (9, 90, 16), (90, 9, 32),
])
def test_centre_of_a_stored_image_is_the_raw_validation_crop(
    width: int, height: int, size: int
) -> None:
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


def test_prepared_folder_gives_the_raw_split_and_validation_tensors(
    prepared: Prepared,
) -> None:
    src, dst, _ = prepared
    kwargs = dict(batch_size=2, val_split=0.4, image_size=S, num_workers=0, seed=3)
    raw, fast = AnimeDataModule(str(src), **kwargs), AnimeDataModule(str(dst), **kwargs)
    raw.setup(), fast.setup()
    assert fast.files == raw.files  # bad files included: they are part of the split rule

    def names(dataset) -> set[str]:
        return {raw.files[i] for i in dataset.file_ids}

    good = set(GOOD)
    assert names(fast.train_dataset) == names(raw.train_dataset) & good
    assert names(fast.val_dataset) == names(raw.val_dataset) & good
    assert names(fast.val_dataset) and names(fast.train_dataset)
    raw_val = {raw.files[i]: raw.val_dataset[k] for k, i in enumerate(raw.val_dataset.file_ids)}
    for k, i in enumerate(fast.val_dataset.file_ids):
        ours, theirs = fast.val_dataset[k], raw_val[raw.files[i]]
        assert ours.shape == (3, S, S)
        # Noise images: a crop off by a pixel or a different scale would differ everywhere.
        assert (ours - theirs).abs().max() <= LEVEL + 1e-6
        assert (ours == theirs).float().mean() > 0.99
    assert fast.skipped == {reason: 1 for reason in BAD.values()}


def test_train_batches_augment_like_the_raw_folder(tmp_path: Path, prepared: Prepared) -> None:
    dst = prepared.dst
    dm = AnimeDataModule(str(dst), batch_size=3, val_split=0.0, image_size=S, num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(GOOD) // 3
    for batch in batches:
        assert batch.dtype == torch.float32 and batch.shape == (3, 3, S, S)
        assert batch.min() >= -1.0 and batch.max() <= 1.0
    # A horizontal ramp: crops move between epochs, and flips (the sign of the slope)
    # are drawn exactly as the raw folder draws them.
    src = tmp_path / "ramp"
    src.mkdir()
    width, height = 60, 30  # stored 32×16: a ramp rising 2/32 per stored pixel
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8)[None, :, None], (height, 1, 3))
    Image.fromarray(ramp).save(src / "ramp.png")
    options = PrepareOptions(size=S)
    prepare_folder(src, tmp_path / "ramp_prepared", options, workers=1, progress=False)
    crops = {}
    for name, folder in (("raw", src), ("prepared", tmp_path / "ramp_prepared")):
        module = AnimeDataModule(str(folder), val_split=0.0, image_size=S, num_workers=0, seed=5)
        module.setup()
        crops[name] = [module.train_dataset[SampleKey(0, epoch)] for epoch in range(12)]
    slopes = {name: [float(c[0, 0, -1] - c[0, 0, 0]) > 0 for c in crops[name]] for name in crops}
    assert slopes["raw"] == slopes["prepared"] and len(set(slopes["raw"])) == 2
    assert len({float(c.mean()) for c in crops["prepared"]}) > 3
    for raw, ours in zip(crops["raw"], crops["prepared"]):  # same position up to rounding
        assert abs(float(raw.mean() - ours.mean())) < 0.6 * 2 / (2 * S)


def test_workers_read_the_same_batches(prepared: Prepared) -> None:
    dst = prepared.dst
    batches = {}
    for workers in (0, 2):
        dm = AnimeDataModule(str(dst), batch_size=2, val_split=0.3, image_size=S,
                             num_workers=workers, persistent_workers=False)
        dm.setup()
        batches[workers] = [torch.cat(list(loader))
                            for loader in (dm.train_dataloader(), dm.val_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    dataset = dm.train_dataset
    dataset[0]  # maps the shards in this process
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._maps is None and torch.equal(copy[1], dataset[1])


def test_smaller_image_size_resizes_and_larger_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    yy, xx = np.mgrid[0:60, 0:90]
    smooth = np.stack([xx * 2.8, yy * 4.2, (xx + yy) * 1.6], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(src / "smooth.png")
    Image.new("RGB", (50, 30), (200, 40, 90)).save(src / "flat.png")
    dst = tmp_path / "prepared32"
    prepare_folder(src, dst, PrepareOptions(size=2 * S), workers=1, progress=False)
    kwargs = dict(val_split=0.5, image_size=S, num_workers=0)
    raw, fast = AnimeDataModule(str(src), **kwargs), AnimeDataModule(str(dst), **kwargs)
    raw.setup(), fast.setup()
    for dataset_raw, dataset_fast in ((raw.val_dataset, fast.val_dataset),
                                      (raw.train_dataset, fast.train_dataset)):
        ours, theirs = dataset_fast[SampleKey(0, 0)], dataset_raw[SampleKey(0, 0)]
        assert ours.shape == (3, S, S) and (ours - theirs).abs().max() < 0.1
    flat = fast.files.index("flat.png")
    dataset = fast.train_dataset if flat in fast.train_dataset.file_ids else fast.val_dataset
    expected = torch.tensor([200, 40, 90]).view(3, 1, 1) / 127.5 - 1
    torch.testing.assert_close(dataset[0] if dataset.file_ids[0] == flat else dataset[1],
                               expected.expand(3, S, S))
    with pytest.raises(ValueError, match=rf"prepared at size {2 * S}.*--size {4 * S}") as error:
        AnimeDataModule(str(dst), image_size=4 * S).setup()
    assert str(dst) in str(error.value)


def test_an_interrupted_run_resumes_and_equals_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _source(tmp_path / "src")
    real, calls = prepare_module._convert, []

    def interrupted(relative: str):
        calls.append(relative)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(relative)

    def counted(relative: str):
        calls.append(relative)
        return real(relative)

    dst = tmp_path / "dst"
    args = ["prepare", str(src), str(dst), "--size", str(S), "--workers", "1",
            "--shard_size_mb", str(2 * S * S * 3 / 2**20), "--no_progress"]  # 2 images a shard
    monkeypatch.setattr(prepare_module, "_convert", interrupted)
    assert main(args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not dst.exists() and (tmp_path / "dst.tmp" / "journal.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(prepare_module, "_convert", counted)
    assert main(args) == 0
    listed = len(GOOD) + len(BAD) - 1  # the dangling link is refused while listing
    assert 0 < len(calls) < listed and "resumed after" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert main(args[:2] + [str(fresh)] + args[3:]) == 0
    resumed, again = read_prepared(dst), read_prepared(fresh)
    assert resumed.paths == again.paths and resumed.skipped == again.skipped
    assert len(resumed.shards) > 2 and np.array_equal(resumed.index, again.index)
    for name in resumed.shards:
        assert (dst / name).read_bytes() == (fresh / name).read_bytes()
    # An interrupted run with other settings is discarded, not mixed in.
    calls.clear()
    monkeypatch.setattr(prepare_module, "_convert", interrupted)
    assert main(args[:2] + [str(tmp_path / "other")] + args[3:]) == 130
    monkeypatch.setattr(prepare_module, "_convert", counted)
    calls.clear()
    other = args[:2] + [str(tmp_path / "other"), "--size", str(S + 2)] + args[5:]
    assert main(other) == 0 and len(calls) == listed
    assert read_prepared(tmp_path / "other").size == S + 2


def test_command_line_errors_name_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(*args: str) -> str:
        assert main(["prepare", *args, "--size", str(S), "--workers", "1", "--no_progress"]) == 1
        return capsys.readouterr().err

    src = _source(tmp_path / "src", bad=False)
    assert "SRC " + str(tmp_path / "nowhere") + " does not exist" in fails(
        str(tmp_path / "nowhere"), str(tmp_path / "a"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("no images")
    assert "holds no images" in fails(str(tmp_path / "notes"), str(tmp_path / "b"))
    assert "not a prepared folder" in fails(str(src), str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "x.txt").exists()  # untouched
    assert "is a file" in fails(str(src), str(tmp_path / "notes" / "x.txt"))
    assert "cannot write" in fails(str(src), str(tmp_path / "notes" / "x.txt" / "under_a_file"))
    (tmp_path / "junk.tmp").mkdir()
    (tmp_path / "junk.tmp" / "mine.doc").write_text("someone else's")
    assert "not written by animevq prepare" in fails(str(src), str(tmp_path / "junk"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    assert "none of the 1 image files" in fails(str(bad), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.tmp").exists()

    dst = tmp_path / "dst"
    assert main(["prepare", str(src), str(dst), "--size", str(S), "--no_progress"]) == 0
    assert main(["prepare", str(src), str(dst), "--size", str(S), "--no_progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["options"]["max_image_bytes"]  # as animevq wrote it before that option existed
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert main(["prepare", str(src), str(dst), "--size", str(S), "--no_progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert "--overwrite" in fails(str(src), str(dst), "--max_aspect", "1.5")
    assert main(["prepare", str(src), str(dst), "--size", str(S + 4), "--overwrite",
                 "--no_progress"]) == 0
    assert read_prepared(dst).size == S + 4 and not (tmp_path / "dst.old").exists()
    # A damaged copy is refused when read, with the way out.
    shard = dst / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match="wrong size.*animevq prepare"):
        AnimeDataModule(str(dst), image_size=S).setup()
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = 99
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="newer animevq"):
        read_prepared(dst)
