"""``DataReport``: a once-per-epoch account of the files the data pipeline skipped."""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from animevq.data.datamodule import AnimeDataModule
from animevq.data.dataset import SkipReport

log = logging.getLogger(__name__)


class DataReport(Callback):
    """At each training epoch end, warn (rank zero) about the files skipped this epoch,
    in training or validation, e.g. ``skipped 3 files this epoch: 1 truncated (a.jpg),
    2 not_an_image (b.png, c.png)``, and log their number as ``data/skipped_files``.

    Under DDP the ranks' ledgers are combined first, so the report and
    ``datamodule.skipped`` cover every rank. Works only with an :class:`AnimeDataModule`
    passed as ``trainer.fit(model, datamodule=...)``; otherwise it does nothing.

    Args:
        max_examples: file names shown per reason.
        log_metric: also log ``data/skipped_files`` through the LightningModule.
    """

    def __init__(self, max_examples: int = 3, log_metric: bool = True) -> None:
        self.max_examples = max_examples
        self.log_metric = log_metric
        self.last_report = SkipReport(())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, AnimeDataModule) or datamodule.ledger is None:
            return
        ledger = datamodule.ledger
        codes = ledger.epoch_codes()  # (N,) int32, 0 where nothing was skipped
        if trainer.world_size > 1:
            # Ranks load disjoint shards; a file is bad on whichever rank tried it.
            codes = trainer.strategy.reduce(codes.to(pl_module.device), reduce_op="max").cpu()
            ledger.merge(codes)
        ledger.reset_epoch()
        report = SkipReport.from_codes(datamodule.files, codes)
        self.last_report = report
        if report.total and trainer.is_global_zero:
            log.warning(report.message(when="this epoch", max_examples=self.max_examples))
        if self.log_metric:
            # Equal on every rank already; sync_dist only keeps Lightning from warning under DDP.
            pl_module.log("data/skipped_files", float(report.total), on_epoch=True, sync_dist=True)
