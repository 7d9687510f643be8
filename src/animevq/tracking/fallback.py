"""Where metrics go when SwanLab cannot take them, so a long run never loses its curves.

Files under the fallback directory:

- ``metrics.csv``: long format, one ``step,key,value`` row per scalar, append-only (a crash
  loses at most the row being written; keys may come and go between steps).
- ``hparams.json``: the hyperparameters, last call wins.
- ``images/<key>_<step>.png``: logged images, ``/`` in keys replaced by ``__``.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["MetricsFallback"]

log = logging.getLogger(__name__)

CSV_HEADER = ("step", "key", "value")


def _as_float(value: Any) -> float | None:
    """A Python float for real numbers and one-element tensors/arrays; ``None`` for media etc."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, np.ndarray) and value.size == 1 and np.isrealobj(value):
        return float(value.item())
    return None


class MetricsFallback:
    """Plain files standing in for a tracker (no I/O until something is written).

    Args:
        directory: where the files go; ``None`` means ``<cwd>/swanlab_fallback``, resolved
            at the first write.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._directory = Path(directory) if directory is not None else None
        self._broken = False  # the fallback itself failed: stop trying, training goes on

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else Path.cwd() / "swanlab_fallback"

    @property
    def csv_path(self) -> Path:
        return self.directory / "metrics.csv"

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        if self._broken:
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return fn(*args)
        except Exception as err:  # e.g. disk full too: the fallback must not stop training either
            self._broken = True
            log.error("could not write %s under fallback dir %s (%s); dropping them", what, self.directory, err)
            return None

    def write_metrics(self, metrics: Mapping[str, Any], step: int | None) -> int:
        """Append every scalar of ``metrics`` as a row; media values are skipped.

        Returns:
            The number of rows written.
        """
        values = {key: _as_float(value) for key, value in metrics.items()}
        row_step = step if step is not None else ""
        rows = [(row_step, key, value) for key, value in values.items() if value is not None]
        if not rows:
            return 0

        def write() -> int:
            new = not self.csv_path.exists()
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(CSV_HEADER)
                writer.writerows(rows)
            return len(rows)

        return self._guard("metrics", write) or 0

    def write_hparams(self, params: Mapping[str, Any]) -> Path | None:
        """Save hyperparameters as JSON (non-JSON values as their ``str``)."""

        def write() -> Path:
            path = self.directory / "hparams.json"
            path.write_text(json.dumps(dict(params), indent=2, default=str, sort_keys=True), encoding="utf-8")
            return path

        return self._guard("hyperparameters", write)

    def write_images(self, key: str, images: Sequence[Any], step: int | None) -> list[Path]:
        """Save uint8 (H,W,3) / (H,W) arrays as PNG files; other image types are skipped."""

        def write() -> list[Path]:
            folder = self.directory / "images"
            folder.mkdir(exist_ok=True)
            paths = []
            for i, image in enumerate(images):
                if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
                    continue
                suffix = f"_{i}" if len(images) > 1 else ""
                path = folder / f"{key.replace('/', '__')}_{step if step is not None else 0:06d}{suffix}.png"
                Image.fromarray(image).save(path)
                paths.append(path)
            return paths

        return self._guard("images", write) or []
