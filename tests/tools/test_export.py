"""``animevq export``: a checkpoint's tokenizer as model.safetensors + config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from animevq import Tokenizer, VQVAEModel
from animevq.tools import export


def test_export_command_writes_the_tokenizer_only(model: VQVAEModel, ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert f"exported {ckpt} to {out}/model.safetensors and {out}/config.json" in capsys.readouterr().out
    assert set(load_file(str(out / "model.safetensors"))) == set(model.tokenizer.state_dict())
    assert json.loads((out / "config.json").read_text())["_format_version"] == 2
    assert Tokenizer.from_pretrained(out).weights_sha256() == model.tokenizer.weights_sha256()
    modes = {(out / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert len(modes) == 1  # one mode for both (safetensors alone wrote 0600, config.json 0644)
    assert not list(out.glob(".*"))  # no temporary file left

    assert export.main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o2")]) == 1
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("animevq export: error: cannot create export folder") and "choose a writable folder" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_tools_default_to_the_training_image_size(model: VQVAEModel, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    from tooling import save_ckpt

    from animevq.tools import codes

    ckpt = save_ckpt(model, tmp_path / "trained48.ckpt", datamodule_hyper_parameters={"image_size": 48})
    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (100, 80), (200, 30, 30)).save(images / "a.png")
    out = tmp_path / "export"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["_image_size"] == 48  # recorded in the export
    for source in (ckpt, out):
        rec = tmp_path / f"rec-{source.name}"
        assert codes.main(["reconstruct", "--ckpt", str(source), "--input", str(images), "--out", str(rec),
                           "--num_workers", "0", "--quiet"]) == 0
        assert Image.open(rec / "a.png").size == (48, 48)  # was: 256×256 whatever the training size
    assert codes.main(["reconstruct", "--ckpt", str(out), "--input", str(images), "--out", str(tmp_path / "r32"),
                       "--image_size", "32", "--num_workers", "0", "--quiet"]) == 0
    assert Image.open(tmp_path / "r32" / "a.png").size == (32, 32)  # given: it wins


def test_a_checkpoint_with_a_weight_ema_exports_and_loads_the_ema(tmp_path: Path) -> None:
    import torch
    from tooling import save_ckpt, trained

    from animevq.runs.checkpoint_io import load_tokenizer, tokenizer_state

    model = trained(optimization={"warmup_steps": 0, "ema_decay": 0.9})
    with torch.no_grad():  # an average that differs from the live weights, as after training
        for p in model.ema_tokenizer.parameters():
            p.mul_(0.5)
    ckpt = save_ckpt(model, tmp_path / "ema.ckpt")
    out = tmp_path / "out"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    written, averaged = load_file(str(out / "model.safetensors")), model.ema_tokenizer.state_dict()
    assert written.keys() == averaged.keys() and all(torch.equal(written[k], averaged[k]) for k in written)
    assert load_tokenizer(ckpt).weights_sha256() == model.ema_tokenizer.weights_sha256()  # evaluate, encode
    assert load_tokenizer(ckpt).weights_sha256() != model.tokenizer.weights_sha256()
    live = tokenizer_state(torch.load(ckpt, weights_only=True)["state_dict"])  # what a resume restores
    assert all(torch.equal(live[k], v) for k, v in model.tokenizer.state_dict().items())
    # An export holds one tokenizer: a model with a weight EMA starts it from the same weights.
    loaded = VQVAEModel.from_pretrained(out, optimization={"ema_decay": 0.9})
    assert loaded.ema_tokenizer is not None and loaded.ema_tokenizer is not loaded.tokenizer
    assert loaded.ema_tokenizer.weights_sha256() == loaded.tokenizer.weights_sha256() == Tokenizer.from_pretrained(
        out).weights_sha256()
