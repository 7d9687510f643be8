"""Bad and unusual files: each is decoded correctly or skipped with the right reason,
batches keep their shape, and the counts are exact with and without worker processes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animevq.data import (
    AnimeDataModule,
    DataReport,
    ImageSkipped,
    SkipReason,
    crop_resize,
    find_images,
    load_image,
    to_tensor,
)
from conftest import tiny_trainer
from poison import BAD_FILES, BLUE, RED, S, write_bad, write_good
from probe import Probe

@pytest.fixture
def poison(tmp_path: Path) -> Path:
    folder = tmp_path / "poison"
    folder.mkdir()
    write_good(folder)
    write_bad(folder, tmp_path / "elsewhere")
    return folder


def _load(path: Path) -> torch.Tensor:
    return to_tensor(crop_resize(load_image(path, target_size=S), S))  # (3,S,S)


def _rgb(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1.0


def test_unusual_files_decode_correctly(poison: Path) -> None:
    tolerance = 0.1  # JPEG rounding on flat colours
    assert (_load(poison / "cmyk.jpg") - _rgb(RED)).abs().max() < tolerance
    gray16 = _load(poison / "gray16.png")  # 32768/65535 → mid grey, not clipped to white
    assert gray16.abs().max() < 0.02
    palette = _load(poison / "palette.png")
    assert torch.equal(palette[:, :, : S // 2], torch.ones(3, S, S // 2))  # transparent → white
    torch.testing.assert_close(palette[:, :, S // 2 + 2 :], _rgb(RED).expand(3, S, S // 2 - 2))
    assert torch.equal(_load(poison / "clear_la.png"), torch.ones(3, S, S))
    upright = load_image(poison / "exif6.jpg")
    assert upright.size == (S, 2 * S)  # portrait after applying the orientation
    exif = _load(poison / "exif6.jpg")  # centre crop: top half red, bottom half blue
    assert (exif[:, 1 : S // 2 - 1] - _rgb(RED)).abs().max() < tolerance
    assert (exif[:, S // 2 + 1 : -1] - _rgb(BLUE)).abs().max() < tolerance
    torch.testing.assert_close(_load(poison / "strip.png"), _rgb((0, 255, 0)).expand(3, S, S))
    torch.testing.assert_close(_load(poison / "anim.gif"), _rgb(RED).expand(3, S, S))
    torch.testing.assert_close(_load(poison / "gray.webp"), _rgb((200,) * 3).expand(3, S, S))
    small = to_tensor(crop_resize(load_image(poison / "plain.bmp"), 2 * 24 + 8))  # upscaled
    torch.testing.assert_close(small, _rgb((10, 200, 30)).expand(3, 56, 56))


@pytest.mark.parametrize("name", [n for n in BAD_FILES if n not in ("loop.png", "outside.png")])
def test_bad_files_are_refused_with_their_reason(poison: Path, name: str) -> None:
    with pytest.raises(ImageSkipped) as skipped:
        load_image(poison / name)
    assert skipped.value.reason.label == BAD_FILES[name]
    assert name in str(skipped.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_interrupted_downloads_are_truncated_in_every_format(tmp_path: Path, fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(noise).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageSkipped) as skipped:
        load_image(path)
    assert skipped.value.reason is SkipReason.TRUNCATED


def test_os_errors_are_unreadable(poison: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")  # root in CI ignores chmod

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageSkipped) as skipped:
        load_image(poison / "plain.bmp")
    assert skipped.value.reason is SkipReason.UNREADABLE


def test_bomb_is_refused_from_its_header(poison: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # even with Pillow's guard off
    start = time.perf_counter()
    with pytest.raises(ImageSkipped) as skipped:
        load_image(poison / "bomb.png")
    assert time.perf_counter() - start < 2.0
    assert skipped.value.reason is SkipReason.TOO_LARGE and "50000x50000" in skipped.value.detail
    monkeypatch.undo()
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageSkipped, match="max_image_pixels=255"):  # our limit, not Pillow's
        load_image(poison / "plain.bmp", max_pixels=255)
    assert Image.MAX_IMAGE_PIXELS == limit  # global Pillow state untouched


def test_links_are_checked_while_listing(poison: Path) -> None:
    discovery = find_images(poison)
    assert {path: reason.label for path, reason in discovery.skipped} == {
        "loop.png": "broken_link", "outside.png": "outside_data_dir",
    }
    assert "alias.jpg" in discovery.files
    assert not any(path.startswith("sub_loop") for path in discovery.files)


@pytest.mark.parametrize("workers", [0, 2])
def test_full_epoch_keeps_batch_shapes_and_counts_exactly(poison: Path, workers: int) -> None:
    # Workers restart each epoch here: a persistent iterator left for the garbage collector
    # makes a later test wait 5 s per worker in torch's shutdown. The Trainer test below
    # covers persistent workers, which Lightning shuts down itself.
    dm = AnimeDataModule(str(poison), batch_size=4, val_split=0.3, image_size=S,
                         num_workers=workers, persistent_workers=False, drop_last=False)
    dm.setup("fit")
    for dataset, loader in ((dm.train_dataset, dm.train_dataloader()),
                            (dm.val_dataset, dm.val_dataloader())):
        sizes = []
        for batch in loader:
            assert batch.shape[1:] == (3, S, S) and torch.isfinite(batch).all()
            sizes.append(batch.shape[0])
        assert sum(sizes) == len(dataset) and all(size == 4 for size in sizes[:-1])
    assert dm.skipped == {reason: 1 for reason in BAD_FILES.values()}
    assert {path for path, _ in dm.skip_report().files} == set(BAD_FILES)


def test_data_report_warns_every_epoch_with_persistent_workers(
    poison: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = AnimeDataModule(str(poison), batch_size=3, val_split=0.3, image_size=S,
                         num_workers=2, drop_last=False)
    assert dm.skipped == {}  # nothing is read before setup
    probe, report = Probe(), DataReport()
    trainer = tiny_trainer(max_epochs=2, callbacks=[report], num_sanity_val_steps=0)
    with caplog.at_level(logging.WARNING, logger="animevq.data"):
        trainer.fit(probe, datamodule=dm)
    listing_reasons = ("broken_link", "outside_data_dir")  # refused before any loading
    loaded_bad = {n: r for n, r in BAD_FILES.items() if r not in listing_reasons}
    epoch_warnings = [r.message for r in caplog.records if "this epoch" in r.message]
    assert len(epoch_warnings) == 2  # both epochs: the ledger is reset, workers persist
    for message in epoch_warnings:
        assert message.startswith(f"skipped {len(loaded_bad)} files this epoch: ")
        assert all(f"1 {reason} ({name})" in message for name, reason in loaded_bad.items())
    assert any("while listing data_dir" in r.message for r in caplog.records)
    assert report.last_report.counts == {reason: 1 for reason in loaded_bad.values()}
    assert float(trainer.callback_metrics["data/skipped_files"]) == len(loaded_bad)
    assert dm.skipped == {reason: 1 for reason in BAD_FILES.values()}
    assert not dm.ledger.epoch_codes().any()  # reset at the last epoch end
    assert all(shape[1:] == (3, S, S) for shape in probe.shapes + probe.val_shapes)


def test_a_folder_of_only_bad_files_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("not an image")
    (tmp_path / "b.jpg").write_bytes(b"")
    dm = AnimeDataModule(str(tmp_path), batch_size=1, val_split=0.0, image_size=S, num_workers=0)
    with pytest.raises(RuntimeError, match=str(tmp_path)) as error:
        next(iter(dm.train_dataloader()))
    assert "1 not_an_image" in str(error.value) and "1 empty" in str(error.value)
    assert dm.skipped == {"not_an_image": 1, "empty": 1}
