"""`animevq fit` mistakes a new user makes: one line each, saying what to type instead; the
traceback only with --verbose (or ANIMEVQ_VERBOSE=1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from clirun import fit_config, make_images

from animevq.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `animevq ARGV` as the console script does; its error line, after checking there is one."""
    monkeypatch.setattr(sys, "argv", ["animevq", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err, err
    assert err[-1].startswith("animevq fit: error: ") and err[-1].endswith("(add --verbose for the traceback)")
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(fit_config(tmp_path / "run", make_images(tmp_path / "images", n=8), logger=False)))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_a_gpu_preset_on_a_machine_without_one_names_the_cpu_options(monkeypatch, capsys, tmp_path: Path) -> None:
    line = _one_line_error(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "vqvae-anime-256.yaml"),
                           "--data.data_dir", str(tmp_path), "--run_dir", str(tmp_path / "run"))
    assert "no CUDA GPU" in line and "--trainer.accelerator cpu" in line and "configs/quickstart.yaml" in line


def test_an_image_size_the_encoder_cannot_halve_names_the_sizes_it_can(monkeypatch, capsys, config: Path) -> None:
    line = _one_line_error(monkeypatch, capsys, "fit", "--config", str(config), "--data.image_size", "40")
    assert "--data.image_size 40 is not a multiple of 16" in line and "use --data.image_size 48 or 32" in line
    monkeypatch.setattr(sys, "argv", ["animevq", "fit", "--config", str(config), "--data.image_size", "40",
                                      "--verbose"])
    with pytest.raises(ValueError, match="not a multiple of 16"):  # --verbose: the exception itself
        main()


def test_a_run_folder_holding_a_run_is_not_reused_without_ckpt_path(monkeypatch, capsys, config: Path) -> None:
    checkpoints = Path(yaml.safe_load(config.read_text())["run_dir"]) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"a run's checkpoint")
    line = _one_line_error(monkeypatch, capsys, "fit", "--config", str(config))
    assert "already holds a run (last.ckpt)" in line and "--ckpt_path last" in line and "another --run_dir" in line
    assert (checkpoints / "last.ckpt").read_bytes() == b"a run's checkpoint"


def test_missing_lpips_weights_name_the_options_that_fix_it(monkeypatch, capsys, config: Path,
                                                            tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_HOME", str(blocker / "torch"))  # no cache and no download: nothing is fetched
    line = _one_line_error(monkeypatch, capsys, "fit", "--config", str(config), "--model.use_lpips", "true")
    assert "LPIPS needs torchvision's ImageNet VGG16 weights" in line
    assert "--model.losses.lpips_vgg_weights /path/to/vgg16-397923af.pth" in line and "--model.use_lpips false" in line


def test_the_summary_names_checkpoints_that_exist_by_absolute_paths(config: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", "--config", str(config)])
    checkpoints = tmp_path / "run" / "checkpoints"
    best = next(checkpoints.glob("best-*.ckpt"))
    # As after a kill that came after a new best was written: last.ckpt records a best file that a
    # later one replaced, with a score the resumed epoch cannot beat.
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    gone, unbeatable = str(checkpoints / "best-gone.ckpt"), torch.tensor(-1.0)
    state.update(best_model_path=gone, best_model_score=unbeatable, kth_best_model_path=gone, kth_value=unbeatable,
                 best_k_models={gone: unbeatable})
    torch.save(last, checkpoints / "last.ckpt")
    capsys.readouterr()
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    lines = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if "checkpoint: " in line]
    paths = [Path(line.split(" (")[0]) for line in lines]
    assert len(paths) == 2 and all(p.is_absolute() and p.is_file() for p in paths), lines  # was: best-gone.ckpt
    assert paths[1] == best.absolute() and "not recorded" in lines[1]
