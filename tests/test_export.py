"""Exports (model.safetensors + config.json), load_pretrained and the light Tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from animevq import export
from animevq.checkpoint import TOKENIZER_PREFIXES, CheckpointError, load_model, weights_sha256
from animevq.export import Tokenizer, export_pretrained, load_pretrained
from animevq.lightning_module import VQVAEModel


@pytest.fixture
def trained(tiny_kwargs: dict) -> VQVAEModel:
    """A tiny VQ-GAN whose codebook statistics moved away from their initial values."""
    model = VQVAEModel(**dict(tiny_kwargs, lambda_gan=0.1))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # EMA updates and dead-code restarts change the quantizer buffers
            model(torch.rand(4, 3, 32, 32) * 2 - 1)
    return model.eval()


def test_export_holds_only_the_tokenizer_and_plain_config(trained: VQVAEModel, tmp_path: Path) -> None:
    export_pretrained(trained, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    expected = {k for k in trained.state_dict() if k.startswith(TOKENIZER_PREFIXES)}
    assert set(state) == expected
    assert any(k.startswith("discriminator.") for k in trained.state_dict())  # left out above
    assert "quantizer.cluster_size" in state and "quantizer.embed_sum" in state
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["encoder_channels"] == list(trained.hparams.encoder_channels)
    assert config["num_embeddings"] == trained.hparams.num_embeddings
    assert config["lambda_gan"] == 0.1


def test_load_pretrained_reproduces_the_model(trained: VQVAEModel, tmp_path: Path) -> None:
    export_pretrained(trained, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert not loaded.training and loaded.lpips is None
    for key, value in trained.state_dict().items():
        if key.startswith(TOKENIZER_PREFIXES):
            assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), trained.encode(x))
    torch.testing.assert_close(loaded(x).reconstruction, trained(x).reconstruction, rtol=0, atol=0)
    assert weights_sha256(loaded) == weights_sha256(trained)
    via_class = VQVAEModel.from_pretrained(str(tmp_path))
    assert torch.equal(via_class.encode(x), trained.encode(x))
    # load_model routes folders and their safetensors file to load_pretrained
    assert weights_sha256(load_model(tmp_path / "model.safetensors")) == weights_sha256(trained)
    assert load_pretrained(tmp_path, learning_rate=1e-3).hparams.learning_rate == 1e-3


def test_tokenizer_gives_identical_codes_and_images(trained: VQVAEModel, tmp_path: Path) -> None:
    export_pretrained(trained, tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert not isinstance(tokenizer, VQVAEModel)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = trained.encode(x)
    assert torch.equal(tokenizer.encode(x), codes)
    assert torch.equal(tokenizer.decode(codes), trained.decode(codes))
    assert torch.equal(tokenizer.decode(codes.view(3, 2, 2)), trained.decode(codes))
    assert torch.equal(tokenizer(x), trained(x).reconstruction)
    assert torch.equal(Tokenizer.from_model(trained).encode(x), codes)
    # A Tokenizer re-exports to the same weights.
    export_pretrained(tokenizer, tmp_path / "again")
    assert weights_sha256(Tokenizer.from_pretrained(tmp_path / "again")) == weights_sha256(trained)


@pytest.mark.slow
def test_tokenizer_loads_without_lightning(trained: VQVAEModel, tmp_path: Path) -> None:
    export_pretrained(trained, tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    expected = trained.encode(x).tolist()
    script = (
        "import sys, torch\n"
        "from animevq.export import Tokenizer\n"
        f"t = Tokenizer.from_pretrained({str(tmp_path)!r})\n"
        f"print(t.encode(torch.load({str(tmp_path / 'x.pt')!r})).tolist())\n"
        "print('lightning' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    codes, lightning_loaded = result.stdout.strip().splitlines()
    assert codes == str(expected)
    assert lightning_loaded == "False"


def test_broken_exports_give_clear_errors(trained: VQVAEModel, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    export_pretrained(trained, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_embeddings=32)))
    mismatch = r"shape mismatches .*quantizer\.embedding: file \(16, 16\) vs model \(32, 16\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        Tokenizer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "model.safetensors"))
    victim = sorted(k for k in state if k.startswith("decoder."))[0]
    state["extra.weight"] = state.pop(victim)
    save_file(state, str(tmp_path / "model.safetensors"))
    keys = rf"missing keys \(1\): {re.escape(victim)}.*unexpected keys \(1\): extra.weight"
    with pytest.raises(CheckpointError, match=keys):
        load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").write_text("not tensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(tmp_path)


def test_export_command(trained: VQVAEModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, ckpt)
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert weights_sha256(load_pretrained(tmp_path / "out")) == weights_sha256(trained)

    assert export.main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o2")]) == 1
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(blocker / "sub")]) == 1
    assert "choose a writable --out" in capsys.readouterr().err
