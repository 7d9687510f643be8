"""Sending images to whichever Lightning loggers a trainer has.

Imports neither SwanLab nor TensorBoard: a logger of theirs can only exist once their
module is loaded, so the check looks in ``sys.modules``. The model can therefore log with
any logger, and import without SwanLab installed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import numpy as np
from lightning.pytorch.loggers import Logger

from .images import check_uint8_image

__all__ = ["log_image"]

log = logging.getLogger(__name__)


def _is_swanlab_logger(logger: Logger) -> bool:
    module = sys.modules.get("swanlab.integration.pytorch_lightning")
    return module is not None and isinstance(logger, module.SwanLabLogger)


def _is_tensorboard_logger(logger: Logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def log_image(
    logger: Logger | Sequence[Logger] | None,
    key: str,
    image_hwc_uint8: np.ndarray,
    step: int,
    caption: str | None = None,
) -> int:
    """Send one uint8 (H,W,3) image to whatever logger(s) the trainer has.

    SwanLab loggers get a ``swanlab.Image`` (PNG, lossless); TensorBoard gets ``add_image``;
    any other logger with a Lightning-style ``log_image(key, images, step)`` gets that; the
    rest are skipped. Loggers log from rank 0 only, so this is safe to call on every rank.

    Args:
        logger: ``trainer.logger``, ``trainer.loggers`` or ``None``.
        key: e.g. ``"train/reconstruction"``.
        image_hwc_uint8: (H,W,3) uint8, e.g. from :func:`make_reconstruction_grid`.
        step: the step to file it under.
        caption: optional caption (SwanLab and loggers that accept ``caption``).

    Returns:
        How many loggers were given the image.
    """
    check_uint8_image(image_hwc_uint8)
    loggers = [] if logger is None else list(logger) if isinstance(logger, Sequence) else [logger]
    sent = 0
    for lg in loggers:
        if _is_swanlab_logger(lg):
            extra = {"caption": [caption]} if caption is not None else {}
            lg.log_image(key, [image_hwc_uint8], step=step, **extra)
        elif _is_tensorboard_logger(lg):
            lg.experiment.add_image(key, image_hwc_uint8, global_step=step, dataformats="HWC")
        elif callable(getattr(lg, "log_image", None)):
            lg.log_image(key=key, images=[image_hwc_uint8], step=step)
        else:
            log.debug("logger %s cannot take images; %s skipped", type(lg).__name__, key)
            continue
        sent += 1
    return sent
