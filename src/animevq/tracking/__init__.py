"""Experiment tracking: SwanLab wiring (local mode by default) and the images we log.

``SwanLabLogger`` here is SwanLab's own Lightning logger
(``swanlab.integration.pytorch_lightning.SwanLabLogger``) with local-mode defaults, a finished
run per fit and a CSV fallback; the seed's ``lightning.pytorch.loggers.SwanLabLogger`` does
not exist. Browse a run with ``swanlab watch <log_dir>``.
"""

from __future__ import annotations

from .fallback import MetricsFallback
from .images import (
    BAR_COLOR,
    check_uint8_image,
    code_usage_plot,
    make_reconstruction_grid,
    to_uint8_hwc,
)
from .logger import SwanLabLogger, log_image
from .mode import MODES, has_cloud_credentials, require_cloud_credentials, resolve_mode, to_swanlab_mode

__all__ = [
    "BAR_COLOR",
    "MODES",
    "MetricsFallback",
    "SwanLabLogger",
    "check_uint8_image",
    "code_usage_plot",
    "has_cloud_credentials",
    "log_image",
    "make_reconstruction_grid",
    "require_cloud_credentials",
    "resolve_mode",
    "to_swanlab_mode",
    "to_uint8_hwc",
]
