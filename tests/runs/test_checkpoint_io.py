"""Checkpoint files: the safe load, what the tools load (a Tokenizer from a checkpoint or
an export), and the errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_trainer
from tooling import SIZE, Payload, save_ckpt, trained, write_images

from animevq import Tokenizer
from animevq.runs.checkpoint_io import CheckpointError, load_tokenizer, safe_torch_load, verify_checkpoint
from animevq.tools import codes


def test_trainer_checkpoint_loads_as_a_tokenizer(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.rand(4, 3, SIZE, SIZE) * 2 - 1, batch_size=2))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    loaded = load_tokenizer(tmp_path / "fit.ckpt")
    assert isinstance(loaded, Tokenizer) and not loaded.training
    assert loaded.weights_sha256() == model.tokenizer.weights_sha256()
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert torch.equal(loaded.encode(x), model.eval().encode(x))
    # Exported folders and their weights file load through the same function.
    model.tokenizer.save_pretrained(tmp_path / "exported")
    for path in (tmp_path / "exported", tmp_path / "exported" / "model.safetensors"):
        assert load_tokenizer(path).weights_sha256() == model.tokenizer.weights_sha256()


def test_pickled_payload_is_refused_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = save_ckpt(trained(), tmp_path / "evil.ckpt", callbacks={"x": Payload(marker)})
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*evil\.ckpt: it holds pickled Python"):
        load_tokenizer(evil)
    images = write_images(tmp_path / "images")
    assert codes.main(["encode", "--ckpt", str(evil), "--data_dir", str(images), "--out", str(tmp_path / "t")]) == 1
    assert "pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    model = trained()
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_tokenizer(tmp_path / "missing.ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a PyTorch file"):
        load_tokenizer(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_tokenizer(tmp_path / "plain.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nohp.ckpt")
    with pytest.raises(CheckpointError, match="has no 'hyper_parameters'"):
        load_tokenizer(tmp_path / "nohp.ckpt")

    state = dict(model.state_dict())
    state["tokenizer.extra.bias"] = state.pop("tokenizer.quantizer.embedding")  # keys are the tokenizer's own
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, tmp_path / "keys.ckpt")
    keys = r"missing keys \(1\): quantizer\.embedding; unexpected keys \(1\): extra\.bias"
    with pytest.raises(CheckpointError, match=keys):
        load_tokenizer(tmp_path / "keys.ckpt")
    hparams = dict(model.hparams, num_embeddings=8)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "shape.ckpt")
    mismatch = r"shape mismatches \(\d+\): .*quantizer\.embedding: file \(16, 16\) vs model \(8, 16\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_tokenizer(tmp_path / "shape.ckpt")




def test_one_pickle_refusal_for_every_reader(tmp_path: Path) -> None:
    """Resume checks (verify_checkpoint), tool loads and plain loads refuse with one message."""
    marker = tmp_path / "pwned"
    evil = save_ckpt(trained(), tmp_path / "evil.ckpt", callbacks={"x": Payload(marker)})
    messages = []
    for read in (lambda: verify_checkpoint(evil, previous_name="previous.ckpt"), lambda: safe_torch_load(evil),
                 lambda: load_tokenizer(evil)):
        with pytest.raises(CheckpointError) as error:
            read()
        messages.append(str(error.value))
    assert len(set(messages)) == 1 and "holds pickled Python objects" in messages[0]
    assert not marker.exists()
