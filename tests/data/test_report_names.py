"""File names leave the data pipeline as printable UTF-8: bytes that are not UTF-8 (Python's
surrogate escapes) and control characters are written as backslash escapes in every report
and log line, while the API keeps the names as the file system gives them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from animevq.data import AnimeDataModule, DataReport, ImageSkipped, load_image
from animevq.tools.prepare import main as prepare_main
from conftest import tiny_trainer
from poison import NOT_UTF8, write_badly_named
from probe import Probe

S = 16
BAD = NOT_UTF8
SHOWN = "bad\\xff.png"  # how reports write it
BROKEN_LINE = "two\nlines.png"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_badly_named(tmp_path / "data", (BAD, BROKEN_LINE), good=4)


def _encodable(text: str) -> str:
    text.encode("utf-8")  # strict: what SwanLab's logger thread and most sinks do
    assert "\n" not in text
    return text


def test_skip_reports_name_bad_files_in_printable_utf8(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """was: 'bad\\udcff.png' in the epoch report, which SwanLab failed to encode every epoch."""
    dm = AnimeDataModule(str(folder), batch_size=1, val_split=0.0, image_size=S, num_workers=0)
    report = DataReport()
    trainer = tiny_trainer(max_epochs=1, callbacks=[report], limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="animevq.data"):
        trainer.fit(Probe(), datamodule=dm)
    [message] = [r.getMessage() for r in caplog.records if "this epoch" in r.getMessage()]
    assert SHOWN in _encodable(message) and "two\\nlines.png" in message
    assert {path for path, _ in report.last_report.files} == {BAD, BROKEN_LINE}  # the real names
    assert dm.skipped == {"not_an_image": 2}
    with pytest.raises(ImageSkipped) as skipped:
        load_image(folder / BAD)
    assert SHOWN in _encodable(str(skipped.value))
    assert skipped.value.path == str(folder / BAD)


def test_prepare_prints_and_stores_such_names(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "prepared"
    args = ["prepare", str(folder), str(dst), "--size", str(S), "--workers", "1", "--no_progress"]
    assert prepare_main(args) == 0
    out = capsys.readouterr().out
    assert SHOWN in out and "two\\nlines.png" in out
    out.encode("utf-8")
    dm = AnimeDataModule(str(dst), val_split=0.0, image_size=S, num_workers=0)
    dm.setup()
    assert {path for path, _ in dm.skip_report().files} == {BAD, BROKEN_LINE}
