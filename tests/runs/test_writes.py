"""Checkpoint writes on full disks and small $TMPDIRs, after SIGKILLs and under Ctrl-C: every
write is atomic inside the run folder, and fails in one line naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from clirun import fit_config, make_images, run_animevq
from disks import small_disk

from animevq.cli import main as cli_main
from animevq.runs.checkpoint_io import verify_checkpoint
from animevq.runs.last import LAST_NAME, PREVIOUS_NAME
from animevq.runs.writer import CheckpointWriteError

CHECKPOINT_BYTES = 920_000  # the tiny model's checkpoint: 914 kB (weights, Adam's moments, RNG states)


def _config(tmp_path: Path, **trainer) -> Path:
    config = fit_config(tmp_path / "run", make_images(tmp_path / "images", n=12), logger=False, **trainer)
    config["save_every_n_steps"] = 1000  # last.ckpt at epoch ends only
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _whole_checkpoints(folder: Path) -> list[str]:
    """The names in ``folder``, after checking that every checkpoint in it is whole."""
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        verify_checkpoint(folder / name, previous_name=PREVIOUS_NAME)
    return names


def test_a_disk_that_fills_up_leaves_no_half_written_best_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, max_epochs=6)
    # Room for last, previous and best, not for the fourth file written beside them. Was: the
    # best-*.ckpt copied from $TMPDIR was left half-written, and the error named no file.
    with small_disk(tmp_path / "run" / "checkpoints", int(3.5 * CHECKPOINT_BYTES)) as folder:
        with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*checkpoints/best-\d+-\d+\.ckpt: "
                                                       r"No space left on device.*--ckpt_path last"):
            cli_main(["fit", "--config", str(config)])
        names = _whole_checkpoints(folder)  # no temporary file, and whatever is there is whole
        assert LAST_NAME in names and PREVIOUS_NAME in names and len(names) == 3
        assert any(name.startswith("best-") for name in names)


def test_checkpoints_never_go_through_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A $TMPDIR too small for one checkpoint. Was: every save failed with a bare OSError naming no
    # path (Lightning's fsspec wrote each file to tempfile.mkstemp() first).
    with small_disk(tmp_path / "tmpdir", 64 * 1024) as tmpdir:
        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
        cli_main(["fit", "--config", str(_config(tmp_path, max_epochs=2))])
        assert list(tmpdir.iterdir()) == []
    names = _whole_checkpoints(tmp_path / "run" / "checkpoints")
    assert LAST_NAME in names and any(name.startswith("best-") for name in names)


def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    left = [folder / ".best-000-0000003.ckpt.4242.tmp", folder / f".{LAST_NAME}.tmp", folder / f".{PREVIOUS_NAME}.tmp"]
    for path in left:
        path.write_bytes(b"half a checkpoint")
    (folder / "notes.tmp").write_text("not ours: kept")
    cli_main(["fit", "--config", str(_config(tmp_path))])
    assert not any(path.exists() for path in left)
    assert (folder / "notes.tmp").exists() and (folder / LAST_NAME).is_file()


@pytest.mark.timeout(200)
def test_ctrl_c_during_the_sigterm_save_waits_for_the_file(tmp_path: Path) -> None:
    # SIGTERM at batch 2 (the first of epoch 2); SIGINT arrives while the checkpoint SIGTERM asked
    # for is being written. Was: the KeyboardInterrupt ended the save, and last.ckpt stayed at batch 2.
    config = yaml.safe_load(_config(tmp_path, max_epochs=3).read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "reliability_callbacks.SigtermAt", "init_args": {"batch": 2}},
        {"class_path": "reliability_callbacks.SigintWhileSaving"},
    ]
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", str(tmp_path / "fit.yaml"), cwd=tmp_path, timeout=150)
    assert result.returncode != 0 and "KeyboardInterrupt" in result.output, result.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints"
    assert _whole_checkpoints(folder)[-2:] == [LAST_NAME, PREVIOUS_NAME]
    assert torch.load(folder / LAST_NAME, weights_only=True)["animevq"]["batches_seen"] == 3
    assert torch.load(folder / PREVIOUS_NAME, weights_only=True)["animevq"]["batches_seen"] == 2
    assert "arrived while a checkpoint was being written" in result.stderr
