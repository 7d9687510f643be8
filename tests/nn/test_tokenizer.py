"""The Tokenizer: a pure nn.Module from one config, its named output, and its files
(model.safetensors + config.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOKENIZER, model_kwargs
from safetensors.torch import load_file, save_file

from animevq.nn import CheckpointError, Tokenizer, TokenizerConfig, TokenizerOutput, VQConfig
from animevq.nn.quantizers import Quantizer, QuantizerOutput


@pytest.fixture
def trained() -> Tokenizer:
    """A tiny tokenizer with quant convs whose codebook statistics moved from their start."""
    config = TokenizerConfig(**{**TINY_TOKENIZER.__dict__, "quantizer": VQConfig(num_embeddings=16, embedding_dim=8)})
    tokenizer = Tokenizer(config).train()
    with torch.no_grad():
        for _ in range(3):  # EMA updates and dead-code restarts change the quantizer's buffers
            tokenizer(torch.rand(4, 3, 32, 32) * 2 - 1)
    return tokenizer.eval()


def test_forward_gives_a_named_output_and_decode_of_encode_equals_it(trained: Tokenizer) -> None:
    x = torch.rand(3, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        out = trained(x)
    assert isinstance(out, TokenizerOutput) and isinstance(out.quantized, QuantizerOutput)
    assert out.reconstruction.shape == x.shape and out.indices.shape == (3, 2, 4)
    assert set(out.quantized.losses) == {"vq_loss", "commitment_loss"}
    codes = trained.encode(x)
    assert codes.shape == (3, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < trained.codebook_size == 16
    assert torch.equal(codes.view(3, 2, 4), out.indices)
    torch.testing.assert_close(trained.decode(codes.view(3, 2, 4)), out.reconstruction)
    with pytest.raises(ValueError, match="not a square grid"):
        trained.decode(codes)
    assert trained.grid_size(256) == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        trained.grid_size(40)


def test_the_quantizer_sits_behind_the_interface(trained: Tokenizer) -> None:
    q = trained.quantizer
    assert isinstance(q, Quantizer) and q.codebook_size == 16 and q.embedding_dim == 8
    z = torch.randn(2, 8, 2, 2)
    indices = q.encode(z)
    assert indices.shape == (2, 2, 2) and indices.dtype == torch.int64
    assert torch.equal(q.indices_to_codes(indices), q.codebook[indices].permute(0, 3, 1, 2))  # (B,h,w,D) → (B,D,h,w)
    out = q(z)  # eval mode: no update
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q, q.indices_to_codes(indices))  # straight-through: the codes' values
    assert out.stats.counts.sum() == 8 and 0 < out.stats.code_usage_rate <= 1


def test_save_pretrained_writes_weights_and_a_versioned_config(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(trained.state_dict())
    assert "quantizer.cluster_size" in state and "quantizer.embed_sum" in state
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_format_version"] == 2 and config["_class_name"] == "Tokenizer"
    assert config["encoder_channels"] == [8, 16, 16, 16]
    assert config["quantizer"]["family"] == "vq" and config["quantizer"]["num_embeddings"] == 16
    assert TokenizerConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")}) == trained.config


def test_from_pretrained_gives_identical_codes_and_images(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == trained.config
    assert loaded.weights_sha256() == trained.weights_sha256()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = trained.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), trained.decode(codes))
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, trained(x).reconstruction)
    loaded.save_pretrained(tmp_path / "again")  # a loaded tokenizer re-exports to the same weights
    assert Tokenizer.from_pretrained(tmp_path / "again").weights_sha256() == trained.weights_sha256()


def test_vqvae_model_from_pretrained_takes_an_export_and_overrides(trained: Tokenizer, tmp_path: Path) -> None:
    from animevq import VQVAEModel

    trained.save_pretrained(tmp_path)
    model = VQVAEModel.from_pretrained(str(tmp_path), learning_rate=1e-3, optimization={"warmup_steps": 7})
    assert not model.training and model.objective.lpips is None
    assert model.tokenizer.weights_sha256() == trained.weights_sha256()
    assert model.hparams.learning_rate == 1e-3 and model.config.optimization.warmup_steps == 7
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode(x), trained.encode(x))
    # A model's tokenizer exports like any other.
    model.tokenizer.save_pretrained(tmp_path / "from_model")
    assert Tokenizer.from_pretrained(tmp_path / "from_model").weights_sha256() == trained.weights_sha256()


@pytest.mark.slow
def test_tokenizer_imports_and_loads_without_lightning_or_swanlab(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from animevq import Tokenizer\n"
        f"t = Tokenizer.from_pretrained({str(tmp_path)!r})\n"
        f"print(t.encode(torch.load({str(tmp_path / 'x.pt')!r})).tolist())\n"
        "print(sorted(m for m in ('lightning', 'swanlab', 'pytorch_lightning') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    codes, loaded = result.stdout.strip().splitlines()
    assert codes == str(trained.encode(x).tolist())
    assert loaded == "[]"


def test_broken_exports_give_clear_errors(trained: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    trained.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    assert config["codebook_size"] == 16
    larger = {**config, "quantizer": {**config["quantizer"], "num_embeddings": 32}}
    (tmp_path / "config.json").write_text(json.dumps(larger))
    with pytest.raises(CheckpointError, match="codebook_size 16 differs from the 32 codes its vq quantizer makes"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**larger, "codebook_size": 32}))
    mismatch = r"shape mismatches .*quantizer\.embedding: file \(16, 8\) vs model \(32, 8\)"
    with pytest.raises(CheckpointError, match=mismatch):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_channel": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json does not describe a tokenizer: .*'latent_channel'"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_format_version": 3}))
    with pytest.raises(CheckpointError, match="newer than this animevq reads"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "model.safetensors"))
    victim = sorted(k for k in state if k.startswith("decoder."))[0]
    state["extra.weight"] = state.pop(victim)
    save_file(state, str(tmp_path / "model.safetensors"))
    keys = rf"missing keys \(1\): {re.escape(victim)}.*unexpected keys \(1\): extra.weight"
    with pytest.raises(CheckpointError, match=keys):
        Tokenizer.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").write_text("not tensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Tokenizer.from_pretrained(tmp_path)


def test_one_seed_builds_the_weights_the_model_builds() -> None:
    """The tokenizer builds its parts in 0.1's order: one seed, one set of initial weights."""
    from animevq import VQVAEModel

    torch.manual_seed(3)
    model = VQVAEModel(**model_kwargs())
    torch.manual_seed(3)
    tokenizer = Tokenizer(model.config.tokenizer)
    assert tokenizer.weights_sha256() == model.tokenizer.weights_sha256()
