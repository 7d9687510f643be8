"""The Tokenizer as a huggingface_hub ModelHubMixin, offline: local folders, the Hub's cache
layout (what a download leaves), HF_HUB_OFFLINE, and the same checks on every path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOKENIZER
from huggingface_hub import ModelHubMixin
from safetensors.torch import load_file, save_file

from animevq import VQVAEModel
from animevq.nn import CheckpointError, Tokenizer

REPO = "animevq-tests/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def tokenizer() -> Tokenizer:
    t = Tokenizer(TINY_TOKENIZER).train()
    with torch.no_grad():
        t(torch.rand(4, 3, 32, 32) * 2 - 1)  # EMA statistics move from their start
    return t.eval()


def cached_repo(tokenizer: Tokenizer, cache: Path) -> Path:
    """``REPO`` in huggingface_hub's cache layout, as a download of it leaves it; its snapshot folder."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return tokenizer.save_pretrained(repo / "snapshots" / COMMIT)


def test_the_mixin_api_round_trips_a_local_folder(tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert isinstance(tokenizer, ModelHubMixin) and callable(tokenizer.push_to_hub)
    out = tokenizer.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: animevq" in card and "- vq-vae" in card
    cache = tmp_path / "cache"
    loaded = Tokenizer.from_pretrained(str(out), revision=None, cache_dir=cache, force_download=False, token=None,
                                       local_files_only=True, map_location="cpu")
    assert loaded.weights_sha256() == tokenizer.weights_sha256() and not loaded.training
    assert not cache.exists()  # a folder is read where it is, nothing goes through the Hub's cache


def test_a_folder_and_a_cached_repo_load_with_hf_hub_offline(tokenizer: Tokenizer, tmp_path: Path) -> None:
    out = tokenizer.save_pretrained(tmp_path / "export")
    cached_repo(tokenizer, tmp_path / "cache")
    script = (
        "from animevq.nn import CheckpointError, Tokenizer\n"
        f"print(Tokenizer.from_pretrained({str(out)!r}).weights_sha256())\n"
        f"print(Tokenizer.from_pretrained({REPO!r}, cache_dir={str(tmp_path / 'cache')!r}).weights_sha256())\n"
        "try:\n    Tokenizer.from_pretrained('animevq-tests/not-cached')\n"
        "except CheckpointError as error:\n    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                            cwd=Path(__file__).resolve().parents[2] / "src")
    assert result.returncode == 0, result.stderr
    folder_sha, repo_sha, refused = result.stdout.strip().splitlines()
    assert folder_sha == repo_sha == tokenizer.weights_sha256()
    assert refused.startswith("animevq-tests/not-cached is not a local folder, and the Hugging Face Hub repo")
    assert refused.endswith("check the path or the repo id and revision")


def test_a_repo_id_reads_the_cache_with_local_files_only(tokenizer: Tokenizer, tmp_path: Path) -> None:
    cached_repo(tokenizer, tmp_path / "cache")
    loaded = Tokenizer.from_pretrained(REPO, cache_dir=tmp_path / "cache", local_files_only=True)
    assert loaded.weights_sha256() == tokenizer.weights_sha256()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    with pytest.raises(CheckpointError, match=r"^animevq-tests/other is not a local folder.*revision$"):
        Tokenizer.from_pretrained("animevq-tests/other", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(CheckpointError, match="does not exist; create it with `animevq export`"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")  # a path, never taken for a repo id


def test_an_untrusted_or_broken_repo_is_refused_like_a_folder(tokenizer: Tokenizer, tmp_path: Path) -> None:
    snapshot = cached_repo(tokenizer, tmp_path / "cache")
    config = json.loads((snapshot / "config.json").read_text())

    def load() -> Tokenizer:
        return Tokenizer.from_pretrained(REPO, cache_dir=tmp_path / "cache", local_files_only=True)

    huge = {**config, "codebook_size": 2**24, "quantizer": {**config["quantizer"], "num_embeddings": 2**24}}
    (snapshot / "config.json").write_text(json.dumps(huge))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*quantizer\.embedding"):
        load()  # checked on the meta device: 2**24 codes are never allocated
    (snapshot / "config.json").write_text(json.dumps({**config, "target": "os.system"}))
    with pytest.raises(CheckpointError, match=r"config\.json does not describe a tokenizer: .*'target'"):
        load()
    (snapshot / "config.json").write_text(json.dumps(config))
    state = load_file(str(snapshot / "model.safetensors"))
    state["decoder.stem.weight"][0] = float("nan")
    save_file(state, str(snapshot / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-finite values in decoder\.stem\.weight"):
        load()
    with pytest.raises(CheckpointError, match=r"non-finite values in decoder\.stem\.weight"):
        VQVAEModel.from_pretrained(REPO, cache_dir=tmp_path / "cache", local_files_only=True)
    torch.save(state, snapshot / "model.safetensors")  # a pickle where safetensors belong
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load()


def test_vqvae_model_from_pretrained_takes_the_same_arguments(tokenizer: Tokenizer, tmp_path: Path) -> None:
    cached_repo(tokenizer, tmp_path / "cache")
    model = VQVAEModel.from_pretrained(REPO, revision=None, cache_dir=tmp_path / "cache", force_download=False,
                                       token=None, local_files_only=True, map_location="cpu", learning_rate=1e-3)
    assert model.tokenizer.weights_sha256() == tokenizer.weights_sha256() and not model.training
    assert model.hparams.learning_rate == 1e-3
    folder = VQVAEModel.from_pretrained(str(tokenizer.save_pretrained(tmp_path / "export")), local_files_only=True)
    assert folder.tokenizer.weights_sha256() == tokenizer.weights_sha256()
