"""Every quantizer family behind the one interface: the Tokenizer, its files, and the CLI and
tools as a user runs them with ``--config configs/quantizer/FAMILY.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from clirun import make_images, run_animevq
from conftest import ROOT

from animevq.nn import Tokenizer, TokenizerConfig
from animevq.nn.quantizer_config import QUANTIZER_CONFIGS, FSQConfig, IBQConfig, LFQConfig, SimVQConfig, VQConfig
from animevq.nn.quantizers import Quantizer
from animevq.tools import run_tool_command

FAMILIES = ("vq", "fsq", "lfq", "simvq", "ibq")
TINY_QUANTIZERS = {
    "vq": VQConfig(num_embeddings=16, embedding_dim=8),
    "fsq": FSQConfig(levels=(4, 3, 3)),
    "lfq": LFQConfig(embedding_dim=5),
    "simvq": SimVQConfig(num_embeddings=16, embedding_dim=8),
    "ibq": IBQConfig(num_embeddings=16, embedding_dim=8),
}


def tiny_tokenizer(family: str) -> Tokenizer:
    torch.manual_seed(0)
    config = TokenizerConfig(latent_channels=16, encoder_channels=(8, 16), decoder_channels=(16, 8), num_res_blocks=1,
                             quantizer=TINY_QUANTIZERS[family])
    tokenizer = Tokenizer(config).train()
    with torch.no_grad():
        for _ in range(2):  # training forwards: VQ-EMA's codebook moves from its start
            tokenizer(torch.rand(4, 3, 16, 16) * 2 - 1)
    return tokenizer.eval()


def test_every_family_is_registered_and_named_in_config_json() -> None:
    assert tuple(QUANTIZER_CONFIGS) == FAMILIES
    for family in FAMILIES:
        assert (ROOT / "configs" / "quantizer" / f"{family}.yaml").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tokenizer_of_each_family_round_trips_codes_images_and_files(family: str, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(family)
    q = tokenizer.quantizer
    assert isinstance(q, Quantizer) and q.codebook_size == TINY_QUANTIZERS[family].codebook_size
    x = torch.rand(3, 3, 16, 32) * 2 - 1
    out = tokenizer(x)
    indices = out.quantized.indices
    assert indices.shape == (3, 4, 8) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < q.codebook_size
    assert torch.allclose(q.indices_to_codes(indices), out.quantized.z_q, atol=1e-6)  # straight-through: z + (z_q − z)
    codes = tokenizer.encode(x)
    assert torch.equal(codes.view(3, 4, 8), indices)
    assert torch.allclose(tokenizer.decode(codes.view(3, 4, 8)), out.reconstruction, atol=1e-6)
    assert all(v.dtype == torch.float32 for v in out.quantized.losses.values())

    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantizer"]["family"] == family and config["codebook_size"] == q.codebook_size
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.config == tokenizer.config
    assert torch.equal(loaded.encode(x), codes) and torch.equal(loaded.decode(codes.view(3, 4, 8)),
                                                               tokenizer.decode(codes.view(3, 4, 8)))
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, {q.codebook_size}\)"):
        tokenizer.decode(torch.full((1, 2, 2), q.codebook_size))


def _overlay(family: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "quantizer" / f"{family}.yaml").read_text())["model"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fit_with_the_family_overlay_then_every_tool(family: str, tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", n=12)
    run = tmp_path / "run"
    result = run_animevq(
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(ROOT / "configs" / "quantizer" / f"{family}.yaml"),
        "--run_dir", str(run), "--data.data_dir", str(images), "--data.image_size", "32", "--data.batch_size", "4",
        "--data.num_workers", "0", "--data.val_split", "0.25", "--trainer.max_steps", "3",
        "--trainer.logger.init_args.mode", "disabled", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.output[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["quantizer"]["family"] == family
    k = _overlay(family).get("num_embeddings", 128)  # quickstart's K unless the overlay sets it
    assert hparams["num_embeddings"] == k

    assert run_tool_command(["evaluate", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(tmp_path / "ev"),
                             "--no_fid"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert np.isfinite(report["psnr"]) and 0 < report["code_usage_rate"] <= 1
    assert run_tool_command(["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out",
                             str(tmp_path / "tokens")]) == 0
    codes = np.concatenate([np.load(p) for p in sorted((tmp_path / "tokens").rglob("*.npy"))])
    assert codes.shape[0] == 12 and 0 <= codes.min() and codes.max() < k
    assert run_tool_command(["decode", "--ckpt", str(ckpt), "--tokens", str(tmp_path / "tokens"), "--out",
                             str(tmp_path / "decoded"), "--quiet"]) == 0
    assert len(list((tmp_path / "decoded").rglob("*.png"))) == 12
    assert run_tool_command(["reconstruct", "--ckpt", str(ckpt), "--input", str(images), "--out",
                             str(tmp_path / "rec")]) == 0
    assert len(list((tmp_path / "rec").rglob("*.png"))) == 12
    assert run_tool_command(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["codebook_size"] == k and exported["quantizer"]["family"] == family
    tokenizer = Tokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer.codebook_size == k


@pytest.mark.parametrize("preset", ["quickstart", "vqvae-anime-256", "vqgan-anime-256"])
@pytest.mark.parametrize("overlay", sorted(p.stem for p in (ROOT / "configs" / "quantizer").glob("*.yaml")))
def test_every_overlay_applies_over_every_preset(preset: str, overlay: str) -> None:
    """The overlay's K and D win over the preset's, and the family's config takes them."""
    from animevq.nn.quantizer_config import QuantizerOptions, quantizer_from_flat

    model = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())["model"]
    extra = yaml.safe_load((ROOT / "configs" / "quantizer" / f"{overlay}.yaml").read_text())["model"]
    group = {**model.get("quantizer", {}), **extra.pop("quantizer")}
    seed = {**model, **extra}
    config = quantizer_from_flat(seed, QuantizerOptions(**group))
    assert config.family == overlay.split("-")[0]
    assert config.codebook_size == seed.get("num_embeddings", VQConfig.num_embeddings)
