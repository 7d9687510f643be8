"""The fit's progress bar: `loss=…` in four digits and no logger version, so it fits 80 columns."""

from __future__ import annotations

from pathlib import Path

from conftest import loader, random_batches, tiny_model, tiny_trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from animevq.tracking.progress import CompactProgressBar


def test_the_bar_shows_the_loss_briefly_and_no_version(tmp_path: Path) -> None:
    shown = {}
    for bar in (TQDMProgressBar(), CompactProgressBar()):
        model = tiny_model(log_every_n_steps=1)
        trainer = tiny_trainer(max_steps=2, logger=CSVLogger(tmp_path), callbacks=[bar], enable_progress_bar=True)
        trainer.fit(model, loader(random_batches(2)))
        shown[type(bar).__name__] = bar.get_metrics(trainer, model)
    assert {"v_num", "train/total_loss"} <= set(shown["TQDMProgressBar"])  # Lightning's own
    compact = shown["CompactProgressBar"]
    assert set(compact) == {"loss"} and len(compact["loss"]) <= 7 and float(compact["loss"]) > 0
