"""Experiment tracking: SwanLab wiring (local mode by default) and the images we log.

``SwanLabLogger`` here is SwanLab's own Lightning logger
(``swanlab.integration.pytorch_lightning.SwanLabLogger``) with local-mode defaults, a finished
run per fit and a CSV fallback; the seed's ``lightning.pytorch.loggers.SwanLabLogger`` does
not exist. Browse a run with ``swanlab watch <log_dir>``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MetricsFallback": ".fallback",
    "BAR_COLOR": ".images",
    "check_uint8_image": ".images",
    "code_usage_plot": ".images",
    "make_reconstruction_grid": ".images",
    "to_uint8_hwc": ".images",
    "log_image": ".media",
    "SwanLabLogger": ".logger",
    "MODES": ".mode",
    "has_cloud_credentials": ".mode",
    "require_cloud_credentials": ".mode",
    "resolve_mode": ".mode",
    "to_swanlab_mode": ".mode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that the model's image helpers import without SwanLab.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'animevq.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
