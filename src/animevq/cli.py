"""The ``animevq`` command (SPEC §7).

``fit`` and ``validate`` are Lightning's, through LightningCLI: every model, data and
trainer argument is settable from YAML (``--config``) or flags. Each run writes into one
run folder (``--run_dir``): checkpoints (last and best by ``val/recon_loss``), the
resolved config and the SwanLab logs.

    animevq fit --config configs/quickstart.yaml
    animevq fit --config configs/quickstart.yaml --ckpt_path last     # resume
    animevq validate --config configs/quickstart.yaml --ckpt_path last

A resumed run continues exactly (``ExactResume``); a damaged checkpoint is refused before
anything is built; a run stopped by SIGTERM writes ``last.ckpt`` and exits with status 143.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import jsonargparse
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .config import MOVED_IN_0_2, ModelConfig
from .data import AnimeDataModule, DataReport
from .nn.config import plain
from .nn.tokenizer import Tokenizer
from .runs.checkpoint_io import CheckpointError, safe_torch_load, tokenizer_state, verify_checkpoint
from .runs.last import LAST_NAME, PREVIOUS_NAME, LastCheckpoint
from .runs.lock import RunFolderBusy, RunFolderLock
from .runs.resume import ExactResume
from .runs.sigterm import EXIT_SIGTERM, HostSigtermCheck
from .runs.writer import AtomicCheckpointIO
from .tracking.progress import CompactProgressBar
from .tools import LIGHTNING_COMMANDS, TOOLS, run_tool_command
from .train.module import VQVAEModel

__all__ = ["AnimeVQCLI", "main"]

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "runs/animevq"


class AnimeVQCLI(LightningCLI):
    """LightningCLI with a run folder, checkpoints and SwanLab (local mode) by default."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate: ``test`` and ``predict`` would need a test split and a prediction
        step that a tokenizer has no use for (``animevq evaluate`` and ``encode``/``reconstruct`` do that)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str,
            default=DEFAULT_RUN_DIR,
            help="Folder of this run: checkpoints/, swanlog/ and config.yaml go here.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/recon_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": False,  # "last" has its own callback: see instantiate_trainer
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch:03d}-{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--save_every_n_steps",
            type=int,
            default=1000,
            help="Write <run_dir>/checkpoints/last.ckpt every N training batches and at every epoch end "
            "(resume with --ckpt_path last).",
        )
        parser.link_arguments("run_dir", "checkpoint.dirpath", compute_fn=lambda d: str(Path(d) / "checkpoints"))
        parser.link_arguments("run_dir", "trainer.default_root_dir")

    def _parse_ckpt_path(self) -> None:
        """Before anything reads the checkpoint: refuse a truncated or corrupt one. Then
        Lightning's merge of its hyperparameters into the config (for ``--ckpt_path FILE``),
        with those of animevq 0.1 (all flat) moved into their groups."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        folder = Path(config["run_dir"]) / "checkpoints"
        if ckpt_path == "last" and not (folder / LAST_NAME).exists() and (folder / PREVIOUS_NAME).is_file():
            # A run that died between the two renames of a save: previous.ckpt is its last whole
            # checkpoint. Starting afresh would write over it.
            log.warning("%s is missing; resuming from %s, the checkpoint written before it",
                        folder / LAST_NAME, folder / PREVIOUS_NAME)
            config["ckpt_path"] = ckpt_path = str(folder / PREVIOUS_NAME)
        self._verify_resume_checkpoint(ckpt_path, Path(config["run_dir"]))
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        checkpoint = safe_torch_load(ckpt_path)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not hparams:
            return
        try:
            model_config = ModelConfig.from_hparams(hparams)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {ckpt_path} holds hyperparameters that build no model: {error}; "
                                  "pass another checkpoint with --ckpt_path") from None
        # The model will be built from these: its weights must fit them before anything is allocated.
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict'); pass another "
                                  "checkpoint with --ckpt_path")
        Tokenizer.check_state(model_config.tokenizer, tokenizer_state(state), source=str(ckpt_path))
        # Lightning would build the model from the file's hyperparameters alone, silently dropping
        # what the user set: here a value set to other than its default (config file or flag) wins,
        # the file fills in the rest. VQVAEModel.on_load_checkpoint then refuses another architecture
        # and lists the settings that changed.
        defaults = self._subcommand_parsers[self.config.subcommand].get_defaults()["model"].as_dict()
        hparams = _explicit_over(model_config.to_hparams(), config["model"].as_dict(), defaults)
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = Path(config["run_dir"])
        _check_before_building(self.subcommand, config, run_dir)
        if "weights_only" in config and config["weights_only"] is None:
            # Lightning would unpickle anything in a resumed checkpoint; ours hold only tensors
            # and plain values, so nothing else is accepted.
            config["weights_only"] = True
        logger = config["trainer"].get("logger")
        if logger is not None and not isinstance(logger, bool) and str(logger.get("class_path", "")).endswith("SwanLabLogger"):
            init = logger["init_args"]
            # SwanLab's files, Lightning's config.yaml and the CSV fallback all live in the run folder.
            if not init.get("log_dir") and not init.get("logdir"):  # SwanLab's own variable, else the run folder
                init["log_dir"] = os.environ.get("SWANLAB_LOG_DIR") or str(run_dir / "swanlog")
            if not init.get("save_dir"):
                init["save_dir"] = str(run_dir)
            if not init.get("fallback_dir"):
                init["fallback_dir"] = str(run_dir / "metrics")

    @staticmethod
    def _verify_resume_checkpoint(ckpt_path: str | None, run_dir: Path) -> None:
        """Refuse a truncated or corrupt checkpoint before the model is even built."""
        if ckpt_path in (None, "best", "hpc"):
            return
        path = run_dir / "checkpoints" / LAST_NAME if ckpt_path == "last" else Path(ckpt_path)
        if path.is_file():
            verify_checkpoint(path, previous_name=PREVIOUS_NAME)
        elif ckpt_path != "last":  # a first run with "last" starts afresh (Lightning warns)
            raise CheckpointError(f"checkpoint {path} does not exist (or is not a file); pass the path of a .ckpt "
                                  f"file, or --ckpt_path last to resume the run in {run_dir}")

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = super().instantiate_trainer(**kwargs)
        for i, callback in enumerate(trainer.callbacks):  # Lightning's default bar (not one a config chose)
            if type(callback) in (TQDMProgressBar, RichProgressBar):
                trainer.callbacks[i] = CompactProgressBar(getattr(callback, "refresh_rate", 1) or 1)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one of the user's plugins
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # last, previous and best: atomic in the run folder
        last = LastCheckpoint(Path(config["run_dir"]) / "checkpoints", every_n_steps=config["save_every_n_steps"])
        # The lock first: nothing of this fit is written into the run folder before it is held.
        trainer.callbacks.insert(0, RunFolderLock(config["run_dir"]))
        trainer.callbacks.insert(1, last)
        trainer.callbacks.insert(2, ExactResume())
        trainer.callbacks.insert(3, HostSigtermCheck())
        return trainer

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        run_dir = Path(self.config["fit"]["run_dir"]).absolute()  # every path printed absolute
        lines = [f"animevq: run folder {run_dir}"]
        last = run_dir / "checkpoints" / LAST_NAME
        if last.exists():
            lines.append(f"  last checkpoint: {last}")
        for ckpt in self.trainer.checkpoint_callbacks:
            if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor:
                best = _best_checkpoint(ckpt)
                if best is not None:
                    lines.append(f"  best checkpoint: {best}")
        swanlog = Path(getattr(self.trainer.logger, "swanlab_log_dir", run_dir / "swanlog")).absolute()
        if swanlog.exists():
            lines.append(f"  SwanLab logs:    {swanlog}")
            lines.append(f"  dashboard:       swanlab watch {swanlog}   (then open the printed http://127.0.0.1 address)")
        print("\n".join(lines), flush=True)


def _best_checkpoint(ckpt: ModelCheckpoint) -> str | None:
    """``PATH (monitor score)`` of the best checkpoint on disk. After a resume, ModelCheckpoint's
    record can name a file that a later best (written after last.ckpt, before a kill) replaced:
    then the newest checkpoint of its folder other than last and previous, whose score is unknown."""
    recorded = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    if recorded is not None and recorded.is_file():
        return f"{recorded.absolute()} ({ckpt.monitor} {float(ckpt.best_model_score):.4f})"
    folder = Path(ckpt.dirpath) if ckpt.dirpath else None
    found = [p for p in folder.glob("*.ckpt") if p.name not in (LAST_NAME, PREVIOUS_NAME)] if folder else []
    if not found:
        return None
    return f"{max(found, key=lambda p: p.stat().st_mtime).absolute()} ({ckpt.monitor} not recorded)"


def _check_before_building(subcommand: str | None, config: Any, run_dir: Path) -> None:
    """The mistakes a new user makes, refused before a model is built, each naming what to type.

    Raises:
        ValueError: a GPU preset on a machine without one, an image size the model cannot
            halve down to its grid, or a fit into a run folder that holds another run's checkpoints.
    """
    accelerator = str(config["trainer"].get("accelerator") or "auto")
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's "gpu" is Apple's GPU there
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        raise ValueError(f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU; train on the CPU with "
                         "--trainer.accelerator cpu --trainer.precision 32 (slow), or start with "
                         "--config configs/quickstart.yaml")
    stages = len(config["model"]["encoder_channels"])
    size = config["data"]["image_size"]
    if isinstance(size, int) and size % 2**stages:
        lower, higher = size // 2**stages * 2**stages, (size // 2**stages + 1) * 2**stages
        raise ValueError(f"--data.image_size {size} is not a multiple of {2**stages} (the encoder halves the image "
                         f"{stages} times): use --data.image_size {higher}" + (f" or {lower}" if lower else ""))
    folder = run_dir / "checkpoints"
    if subcommand == "fit" and config.get("ckpt_path") is None and folder.is_dir():
        found = sorted(p.name for p in folder.glob("*.ckpt"))
        if found:
            raise ValueError(f"run folder {run_dir} already holds a run ({', '.join(found[:3])}"
                             f"{', ...' if len(found) > 3 else ''}): resume it with --ckpt_path last, or start "
                             "another run with another --run_dir")
    if config.get("ckpt_path") == "last" and not (folder / LAST_NAME).is_file() \
            and not (folder / PREVIOUS_NAME).is_file():
        log.warning("--ckpt_path last: %s holds no checkpoint to resume, so this is a new run", folder)


def _explicit_over(saved: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with every value of ``given`` that differs from ``defaults`` put over it (nested groups too)."""
    out = dict(saved)
    for key, value in given.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            out[key] = _explicit_over(saved[key], value, default if isinstance(default, dict) else {})
        elif plain(value) != plain(default):
            out[key] = value
    return out


def _trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {"class_path": "animevq.tracking.SwanLabLogger", "init_args": {"project": "animevq"}},
        "callbacks": [DataReport()],  # persistent: added to any callbacks a config lists
        "log_every_n_steps": 1,  # the model logs at its own log_every_n_steps
    }


# Mistakes of input or environment, told by their message alone; any other error also by its type.
_USER_ERRORS = (ValueError, OSError, RunFolderBusy, MisconfigurationException)
VERBOSE_ENV = "ANIMEVQ_VERBOSE"  # set (to anything but 0) for tracebacks instead of one-line errors


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``animevq`` console script.

    From the command line an error is one line (``animevq fit: error: ...``) and status 1; with
    ``--verbose`` or ``ANIMEVQ_VERBOSE=1`` it is the traceback. Called with ``argv`` from Python,
    errors are raised as exceptions.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_noise()
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--verbose"]
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in TOOLS:
        raise SystemExit(run_tool_command(argv))
    moved = _moved_options(argv)
    if moved:
        print("\n".join(f"animevq: error: {m}" for m in moved), file=sys.stderr)
        raise SystemExit(2)
    try:
        # LightningCLI reads sys.argv itself, and warns when also handed the same arguments.
        _run_cli(None if from_command_line else argv)
    except SIGTERMException:
        log.warning("stopped by SIGTERM after writing the last checkpoint; resume with --ckpt_path last")
        raise SystemExit(EXIT_SIGTERM) from None
    except Exception as error:
        if verbose or not from_command_line:
            raise
        command = next((arg for arg in argv if not arg.startswith("-")), "animevq")
        message = " ".join(str(error).split()) or type(error).__name__
        from .nn.lpips import VGGWeightsMissing  # torchvision: imported only when there is an error

        if not isinstance(error, (*_USER_ERRORS, VGGWeightsMissing)):  # a failure of ours or a library's: say which
            message = f"{type(error).__name__}: {message}"
        print(f"animevq {command}: error: {message} (add --verbose for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


# Lightning's notices that say nothing to an animevq user: an advertisement, a deprecation inside
# Lightning itself, and a notice about a hook that animevq overrides on purpose.
_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",
          r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`")


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def _quiet_known_noise() -> None:
    """Filter the notices of ``_NOISE`` and Lightning's litlogger tip (once: filters are not added twice)."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advertisement)


def _moved_options(argv: list[str]) -> list[str]:
    """One line per option given in animevq 0.1's flat spelling (a flag or a key of a --config
    file), saying where 0.2 takes it; LightningCLI alone would only call it unknown."""
    found: list[tuple[str, str]] = []  # (where, old name)
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name.startswith("--model.") and name[len("--model."):] in MOVED_IN_0_2:
            found.append(("the command line", name[len("--model."):]))
        if name in ("--config", "-c") and i + 1 < len(argv) or name.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else argv[i + 1])
            try:
                import yaml

                config = yaml.safe_load(path.read_text())
            except (OSError, ValueError, yaml.YAMLError):
                continue  # LightningCLI reports a missing or broken file
            if not isinstance(config, dict):
                continue
            for section in (config, *(config.get(c) for c in ("fit", "validate", "test", "predict"))):
                model = section.get("model") if isinstance(section, dict) else None
                if isinstance(model, dict):
                    found += [(str(path), key) for key in model if key in MOVED_IN_0_2]
    return [f"model.{old} (in {where}) moved to model.{MOVED_IN_0_2[old]} in animevq 0.2: "
            f"write --model.{MOVED_IN_0_2[old]}, or nest it under {MOVED_IN_0_2[old].split('.')[0]}: in YAML"
            for where, old in found]


def _run_cli(argv: list[str] | None) -> None:
    # The config dataclasses document each field in a docstring below it: show them in --help.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    AnimeVQCLI(
        VQVAEModel,
        AnimeDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=argv,
        parser_kwargs={
            "description": "animevq: train and use VQ-VAE / VQ-GAN image tokenizers. "
            "fit and validate take --config YAML; "
            f"tools: {', '.join(TOOLS)} (each with --help; `animevq --help` lists every command).",
        },
    )


if __name__ == "__main__":
    main()
