"""Files written by animevq 0.1.0 (tests/fixtures/v0_1_0, made by its make.py before the 0.2
redesign) still load for resume, validate, evaluate, encode, decode and export, and give the
same codes and images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from clirun import run_animevq
from conftest import FIXTURES
from PIL import Image

from animevq import Tokenizer, VQVAEModel
from animevq.runs.checkpoint_io import load_tokenizer
from animevq.tools import codes, evaluate, export

V010 = FIXTURES / "v0_1_0"
CASES = {  # file → the codes and decodings 0.1.0 gave for inputs.npy
    "vqvae/checkpoints/last.ckpt": ("codes.npy", "decoded.npy", "reconstructed.npy"),
    "export": ("codes.npy", "decoded.npy", "reconstructed.npy"),
    "vqgan/checkpoints/last.ckpt": ("vqgan_codes.npy", "vqgan_decoded.npy", "vqgan_reconstructed.npy"),
}


def _array(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(V010 / name))


@pytest.mark.parametrize("path", sorted(CASES))
def test_checkpoints_and_exports_give_the_same_codes_and_images(path: str) -> None:
    codes_name, decoded_name, reconstructed_name = CASES[path]
    tokenizer = load_tokenizer(V010 / path)
    x = _array("inputs.npy")
    grid = tokenizer.encode(x)
    assert torch.equal(grid, _array(codes_name))
    # Bit for bit where this CPU rounds as 0.1.0's did; other CPUs' kernels differ by ~1e-8.
    torch.testing.assert_close(tokenizer.decode(grid), _array(decoded_name), rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # float rounding only: 0.1.0's process differed in thread state
        torch.testing.assert_close(tokenizer(x).reconstruction, _array(reconstructed_name))


def test_the_export_and_its_checkpoint_hash_alike_as_in_0_1() -> None:
    manifest = json.loads((V010 / "tokens" / "manifest.json").read_text())
    for path in ("export", "vqvae/checkpoints/last.ckpt"):
        assert load_tokenizer(V010 / path).weights_sha256() == manifest["model_sha256"]


def test_vqvae_model_from_a_0_1_export_keeps_its_training_settings() -> None:
    model = VQVAEModel.from_pretrained(str(V010 / "export"))
    assert model.config.optimization.warmup_steps == 2 and model.hparams.log_every_n_steps == 1
    assert model.objective.lpips is None  # LPIPS stays off unless asked for
    assert model.tokenizer.weights_sha256() == load_tokenizer(V010 / "export").weights_sha256()


def test_a_0_1_token_folder_decodes_to_the_same_images(tmp_path: Path) -> None:
    out = tmp_path / "decoded"
    assert codes.main(["decode", "--ckpt", str(V010 / "export"), "--tokens", str(V010 / "tokens"),
                       "--out", str(out), "--quiet"]) == 0
    expected = ((_array("decoded.npy").clamp(-1, 1) + 1) * 127.5).round()  # inputs.npy's images, in file order
    for i, name in enumerate(sorted(p.name for p in (V010 / "images").iterdir())):
        png = torch.from_numpy(np.array(Image.open(out / name))).permute(2, 0, 1).float()
        assert torch.equal(png, expected[i]), name


def test_encode_with_a_0_1_checkpoint_matches_its_token_folder(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    assert codes.main(["encode", "--ckpt", str(V010 / "vqvae/checkpoints/last.ckpt"), "--data_dir",
                       str(V010 / "images"), "--out", str(out), "--image_size", "32", "--device", "cpu",
                       "--num_workers", "0", "--quiet"]) == 0
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, V010 / "tokens"))
    assert {k: v for k, v in ours.items() if k != "data_dir"} == {k: v for k, v in theirs.items() if k != "data_dir"}
    assert np.array_equal(np.load(out / "codes-00000.npy"), np.load(V010 / "tokens" / "codes-00000.npy"))


def test_export_and_evaluate_take_a_0_1_checkpoint(tmp_path: Path) -> None:
    ckpt = V010 / "vqgan/checkpoints/last.ckpt"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "v2")]) == 0
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["_format_version"] == 2
    again = Tokenizer.from_pretrained(tmp_path / "v2")
    assert again.weights_sha256() == load_tokenizer(ckpt).weights_sha256()
    report = evaluate.evaluate(again, V010 / "images", image_size=32, compute_fid=False, progress=False,
                               lpips_vgg_weights=None)
    assert report["num_images"] == 8 and report["model_sha256"] == again.weights_sha256()


def _fit_here(tmp_path: Path, name: str, model: dict, epochs: int, run_dir: str) -> Path:
    """A run from scratch here of the fixture's config for ``epochs``: its last checkpoint."""
    config = yaml.safe_load(_run_folder(tmp_path, name, model, epochs=epochs).read_text())
    config["run_dir"] = run_dir
    (tmp_path / f"{run_dir}.yaml").write_text(yaml.safe_dump(config))
    result = run_animevq("fit", "--config", f"{run_dir}.yaml", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / run_dir / "checkpoints" / "last.ckpt"


def assert_resumed_as_0_1(tmp_path: Path, name: str, model: dict, last: Path) -> None:
    """The weights a resume of a 0.1.0 run ends in are those 0.1.0 reached: by its recorded hash
    where this machine trains as the fixtures' machine did (a one-epoch run from scratch here
    ends in the fixture's checkpoint, bit for bit), else (the hash cannot match: other vector
    units round the backward pass differently, even where the forward pass agrees) those of an
    uninterrupted two-epoch run of the same config here, to float rounding."""
    expected = json.loads((V010 / name / "resumed.json").read_text())
    first_epoch = load_tokenizer(_fit_here(tmp_path / "scratch", name, model, 1, "one_epoch")).weights_sha256()
    if first_epoch == load_tokenizer(V010 / name / "checkpoints" / "last.ckpt").weights_sha256():
        assert load_tokenizer(last).weights_sha256() == expected["weights_sha256"]
        return
    fresh = load_tokenizer(_fit_here(tmp_path / "fresh", name, model, 2, "uninterrupted")).state_dict()
    resumed = load_tokenizer(last).state_dict()
    assert resumed.keys() == fresh.keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value, fresh[key], rtol=1e-5, atol=1e-6, msg=key)


def _run_folder(tmp_path: Path, name: str, model: dict, epochs: int) -> Path:
    """A copy of a 0.1.0 run folder and a 0.2 config that continues it (the config's keys moved
    into groups; the fixture's discriminator is 8 filters wide, see make.py)."""
    shutil.copytree(V010 / name, tmp_path / name)
    shutil.copytree(V010 / "images", tmp_path / "images")
    old = yaml.safe_load((V010 / name / "fit.yaml").read_text())
    old["model"] = {**{k: v for k, v in old["model"].items() if k not in ("warmup_steps", "disc_start", "lecam_weight")},
                    "optimization": {"warmup_steps": old["model"]["warmup_steps"]}, **model}
    old["trainer"]["max_epochs"] = epochs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(old))
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "model"), [
    ("vqvae", {}),
    ("vqgan", {"adversarial": {"disc_start": 0, "lecam_weight": 0.001, "disc_channels": 8}}),
])
def test_a_0_1_run_resumes_to_the_weights_0_1_reached(tmp_path: Path, name: str, model: dict) -> None:
    """0.1.0 resumed each fixture run for a second epoch and recorded where it ended
    (resumed.json); the same resume now ends in the same weights, bit for bit where this machine
    trains as 0.1.0's did (one thread, as there; see :func:`assert_resumed_as_0_1`)."""
    config = _run_folder(tmp_path, name, model, epochs=2)
    result = run_animevq("fit", "--config", str(config), "--ckpt_path", "last", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = json.loads((V010 / name / "resumed.json").read_text())
    last = tmp_path / name / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["animevq"]["batches_seen"] == expected["batches_seen"]
    assert saved["global_step"] == expected["global_step"]
    assert_resumed_as_0_1(tmp_path, name, model, last)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_0_1_checkpoint_given_by_path_validates_and_resumes(tmp_path: Path) -> None:
    """``--ckpt_path FILE`` makes Lightning read the file's (0.1, flat) hyperparameters into the config."""
    config = _run_folder(tmp_path, "vqvae", {}, epochs=2)
    ckpt = tmp_path / "vqvae" / "checkpoints" / "last.ckpt"
    result = run_animevq("validate", "--config", str(config), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "val/recon_loss" in result.stdout
    result = run_animevq("fit", "--config", str(config), "--ckpt_path", str(ckpt), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_resumed_as_0_1(tmp_path, "vqvae", {}, tmp_path / "vqvae/checkpoints/last.ckpt")


def test_a_0_1_config_file_names_where_each_moved_option_went(capsys: pytest.CaptureFixture[str]) -> None:
    from animevq.cli import main as cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(V010 / "vqgan" / "fit.yaml"), "--model.grad_clip_norm", "1"])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = {"disc_start": "adversarial", "lecam_weight": "adversarial", "warmup_steps": "optimization",
                "grad_clip_norm": "optimization"}
    assert len(lines) == len(expected)
    for old, group in expected.items():
        assert any(f"model.{old} " in line and f"moved to model.{group}.{old}" in line for line in lines), old
