"""animevq's SwanLab logger: SwanLab's Lightning logger with local-first, never-blocking defaults.

The seed imports ``SwanLabLogger`` from ``lightning.pytorch.loggers``, which has no such class
(Lightning 2.6); the real one is ``swanlab.integration.pytorch_lightning.SwanLabLogger``. Ours
subclasses it, keeps its constructor, and changes what a long unattended run needs:

- mode ``local`` by default (SwanLab's own default, cloud, hangs at a login prompt), SwanLab
  never prompts, and ``cloud`` without credentials is an immediate, actionable error;
- the SwanLab run is finished when Lightning finalizes, so the next fit is a new experiment
  (the parent only closes crashed runs);
- tracking never stops training: if the log dir is unwritable or SwanLab raises, one warning
  is issued and metrics go to ``<fallback_dir>/metrics.csv`` (see :mod:`.fallback`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import swanlab
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from swanlab.integration.pytorch_lightning import SwanLabLogger as _SwanLabLoggerBase

from .fallback import MetricsFallback
from .media import log_image
from .mode import require_cloud_credentials, resolve_mode, to_swanlab_mode

__all__ = ["SwanLabLogger", "log_image"]

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "animevq"
DEFAULT_LOG_DIR = "swanlog"  # SwanLab's own default folder name, so `swanlab watch` finds it


class _NullRun:
    """Stands in for the SwanLab run after a failure: ``logger.experiment.anything(...)`` in user
    code keeps working and does nothing."""

    id = None

    @property
    def config(self) -> dict[str, Any]:
        return {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _check_writable(log_dir: Path) -> None:
    """Raise an OSError naming ``log_dir`` if SwanLab could not create files under it."""
    probe = log_dir.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"log_dir {log_dir} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"log_dir {log_dir} is not writable ({probe} denies write access)")


class SwanLabLogger(_SwanLabLoggerBase):
    """SwanLab's Lightning logger (``swanlab.integration.pytorch_lightning.SwanLabLogger``) with
    local-mode defaults; importable as ``animevq.SwanLabLogger`` and usable from a LightningCLI
    YAML as ``trainer.logger: {class_path: animevq.SwanLabLogger}``.

    Args:
        project: SwanLab project name (one dashboard per ``log_dir`` in local mode).
        workspace: SwanLab workspace (cloud only).
        experiment_name: run name; SwanLab picks one when ``None``, and appends ``-N`` when a
            name is taken in ``log_dir``.
        description: free-text note on the run; ``notes`` (the seed's spelling) is the same.
        log_dir: where local/offline runs are written (default ``swanlog``; ``animevq fit``
            uses ``<run_dir>/swanlog``); browse with ``swanlab watch <log_dir>``.
        logdir: older SwanLab spelling of ``log_dir``.
        mode: ``local`` | ``offline`` | ``cloud`` | ``disabled``; ``None`` reads ``SWANLAB_MODE``
            and falls back to ``local`` (see :func:`~animevq.tracking.resolve_mode`).
        save_dir: root for Lightning's files (checkpoints go to
            ``<save_dir>/<project>/<run id>/checkpoints``); defaults to ``log_dir``.
        tags: run tags.
        id: run id to resume (cloud mode).
        config: extra configuration recorded with the run (hyperparameters are added by
            Lightning through :meth:`log_hyperparams`).
        notes: alias of ``description``, as written in the seed README.
        fallback_dir: where metrics go if SwanLab fails; default ``<cwd>/swanlab_fallback``.
        **kwargs: passed on to ``swanlab.init`` (e.g. ``group``, ``job_type``, ``settings``).

    Raises:
        ValueError: unknown mode; ``cloud`` without credentials; ``description`` and
            ``notes`` both given.
    """

    def __init__(
        self,
        project: str = DEFAULT_PROJECT,
        workspace: str | None = None,
        experiment_name: str | None = None,
        description: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        logdir: str | os.PathLike[str] | None = None,
        mode: str | None = None,
        save_dir: str | os.PathLike[str] | None = None,
        tags: list[str] | None = None,
        id: str | None = None,  # noqa: A002 - SwanLab's parameter name
        config: dict[str, Any] | None = None,
        notes: str | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if notes is not None and description is not None and notes != description:
            raise ValueError("give the run's note once: `description` and `notes` are the same setting")
        self.mode = resolve_mode(mode)
        if self.mode == "cloud":
            require_cloud_credentials()
        self._swan_log_dir = Path(logdir or log_dir or DEFAULT_LOG_DIR)
        if config is not None:
            kwargs["config"] = dict(config)
        super().__init__(
            project=project,
            workspace=workspace,
            experiment_name=experiment_name,
            description=description if description is not None else notes,
            log_dir=os.fspath(self._swan_log_dir),
            mode=to_swanlab_mode(self.mode),
            save_dir=os.fspath(save_dir if save_dir is not None else self._swan_log_dir),
            tags=list(tags) if tags is not None else None,  # the parent appends to the list
            id=id,
            **kwargs,
        )
        self.fallback = MetricsFallback(fallback_dir)
        self.failure: str | None = None  # why SwanLab was abandoned, once it has been
        self._run_id: str | None = None  # kept after finish, so Lightning's paths stay stable
        self._fallback_version = time.strftime("%Y%m%d_%H%M%S")

    # --- identity used by Lightning for checkpoint paths -------------------------------------

    @property
    def swanlab_log_dir(self) -> Path:
        """Where SwanLab writes this run (``swanlab watch`` this folder)."""
        return self._swan_log_dir

    @property
    def name(self) -> str:
        return str(self._init_kwargs.get("project", DEFAULT_PROJECT))

    @property
    def version(self) -> str:
        return self._run_id or self._fallback_version

    # --- the run -------------------------------------------------------------------------------

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The live ``swanlab.Run`` (started on first use), or a no-op stand-in after a failure."""
        if self.failure is not None:
            return _NullRun()
        if self._experiment is None:
            try:
                if self.mode in ("local", "offline"):
                    _check_writable(self._swan_log_dir)
                # Belt and braces: even if a mode slips through as cloud, never wait on input().
                self._init_kwargs.setdefault("settings", swanlab.Settings(interactive=False))
                run = super().experiment
            except Exception as err:  # SwanLab's errors are not a reason to stop training
                self._fail(f"could not start a SwanLab run in {self._swan_log_dir}", err)
                return _NullRun()
            self._run_id = getattr(run, "id", None) or self._run_id
        return self._experiment

    def _fail(self, what: str, err: BaseException) -> None:
        self.failure = f"{what}: {type(err).__name__}: {err}"
        warnings.warn(
            f"SwanLab tracking disabled ({self.failure}). Training continues; scalars now go to "
            f"{self.fallback.csv_path}.",
            RuntimeWarning,
            stacklevel=3,
        )
        self._experiment = None
        try:  # a half-started run would swallow the next fit's data
            if swanlab.has_run():
                swanlab.finish(state="crashed", error=self.failure)
        except Exception:
            pass

    # --- Lightning Logger interface -----------------------------------------------------------

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        if self.failure is None:
            try:
                self.experiment.config.update(self._params_to_dict(params))
            except Exception as err:
                self._fail("SwanLab failed to record hyperparameters", err)
        if self.failure is not None:
            self.fallback.write_hparams(self._params_to_dict(params))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.failure is None:
            try:
                run = self.experiment
                if self.failure is None:
                    run.log(dict(metrics), step=step)
                    return
            except Exception as err:
                self._fail("SwanLab failed to log metrics", err)
        self.fallback.write_metrics(metrics, step)

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        """Log images (uint8 (H,W,3) arrays are best) under ``key``; ``kwargs`` such as
        ``caption`` take one value per image."""
        if not isinstance(images, list):  # a usage error, not a tracking failure
            raise TypeError(f"images for {key!r} must be a list, got {type(images).__name__}")
        if self.failure is None:
            try:
                super().log_image(key, images, step, **kwargs)
            except Exception as err:
                self._fail("SwanLab failed to log images", err)
        if self.failure is not None:
            self.fallback.write_images(key, images, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Close the SwanLab run (crashed unless ``status`` is success), so the next
        fit/validate starts a new experiment instead of appending to this one."""
        if self._experiment is None:
            return
        try:
            if status in ("success", "finished"):
                if swanlab.has_run():
                    swanlab.finish()
            else:
                super().finalize(status)
        except Exception as err:
            warnings.warn(f"SwanLab could not finish run {self._run_id}: {err}", RuntimeWarning, stacklevel=2)
        finally:
            self._experiment = None


