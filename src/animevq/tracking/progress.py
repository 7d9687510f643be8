"""The fit's progress bar: the loss under a short name, no logger version, one line at 80 columns."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["CompactProgressBar"]

SHORT_NAMES = {"train/total_loss": "loss"}  # what the bar calls the metrics logged with prog_bar=True


class CompactProgressBar(TQDMProgressBar):
    """Lightning's bar without ``v_num`` (a SwanLab run id of 20 characters), with ``loss=0.1234``
    for ``train/total_loss=0.123456789``: at 80 columns the bar and the loss share one line."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float | dict[str, float]]:
        shown: dict[str, Any] = {}
        for name, value in super().get_metrics(trainer, pl_module).items():
            if name == "v_num":
                continue
            shown[SHORT_NAMES.get(name, name)] = f"{value:.4g}" if isinstance(value, float) else value
        return shown
