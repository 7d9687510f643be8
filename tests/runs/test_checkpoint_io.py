"""Checkpoint files: the safe load, what the tools load (a Tokenizer from a checkpoint or
an export), and the errors that name the problem."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_trainer
from tooling import SIZE, Payload, flip_a_tensor_byte, save_ckpt, trained, write_images

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


QUANTIZER_KEYS = {"num_embeddings", "restart_sampling"}  # nested under "quantizer" in an export's config.json


@pytest.mark.parametrize(("change", "message"), [
    ({"num_embeddings": 8_000_000}, "quantizer.embedding: file (16, 16) vs model (8000000, 16)"),  # checked on meta
    ({"num_embeddings": 2**30}, "num_embeddings must lie in [1, 16777216]"),
    ({"num_embeddings": 8e6}, "num_embeddings must be an int, got 8000000.0"),
    ({"latent_channels": "16"}, "latent_channels must be an int, got '16'"),
    ({"encoder_channels": [8]}, "must have the same number of stages"),
    ({"restart_sampling": "sometimes"}, "restart_sampling must be one of"),
])
def test_tampered_hyperparameters_are_refused_naming_the_file(tmp_path: Path, change: dict, message: str) -> None:
    model = trained()
    path = tmp_path / "tampered.ckpt"
    hparams = dict(model.hparams)
    for key, value in change.items():  # the quantizer's options sit in their group; the seed's K stays flat
        (hparams["quantizer"] if key == "restart_sampling" else hparams)[key] = value
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*{re.escape(message)}"):
        load_tokenizer(path)
    # An export's config.json, the same way.
    folder = tmp_path / "export"
    model.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        (config["quantizer"] if key in QUANTIZER_KEYS else config)[key] = value
        if key == "num_embeddings" and isinstance(value, int):  # a consistent tamper: K is written twice
            config["codebook_size"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder))}.*{re.escape(message)}"):
        Tokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_a_file_asking_for_gigabytes_is_refused_before_allocating(tmp_path: Path) -> None:
    """A tiny checkpoint whose hyperparameters claim 16.7M codes (2 GiB of codebook): the peak
    memory of loading it stays that of loading a good one (each measured in a fresh process)."""
    model = trained()
    good, evil = tmp_path / "good.ckpt", tmp_path / "evil.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, good)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {**model.hparams, "num_embeddings": 2**24}}, evil)
    script = ("import sys\nfrom animevq.runs.checkpoint_io import load_tokenizer\n"
              "try:\n    load_tokenizer(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', str(e)[:400])\n"
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")

    def peak_kib(path: Path) -> tuple[int, str]:
        result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                timeout=120, check=True)
        lines = result.stdout.strip().splitlines()
        return int(lines[-1]), lines[0]

    good_peak, _ = peak_kib(good)
    evil_peak, said = peak_kib(evil)
    assert said.startswith("refused:") and "vs model (16777216, 16)" in said
    assert evil_peak - good_peak < 256 * 1024  # KiB: far below the 2 GiB the file asked for


def test_resuming_a_checkpoint_with_tampered_hyperparameters_is_refused(tmp_path: Path) -> None:
    from animevq.cli import main as cli_main

    model = trained()
    run = tmp_path / "run" / "checkpoints"
    trainer = tiny_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.rand(2, 3, SIZE, SIZE) * 2 - 1, batch_size=2))
    run.mkdir(parents=True)
    trainer.save_checkpoint(run / "last.ckpt")
    checkpoint = torch.load(run / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["num_embeddings"] = 8_000_000
    torch.save(checkpoint, run / "last.ckpt")
    common = ["fit", "--run_dir", str(tmp_path / "run"), "--trainer.logger", "false", "--model.use_lpips", "false"]
    # By path, Lightning would build the model from the file's hyperparameters: they must fit its weights first.
    with pytest.raises(CheckpointError, match=r"last\.ckpt does not fit .*vs model \(8000000, 16\)"):
        cli_main([*common, "--ckpt_path", str(run / "last.ckpt")])
    # As 'last', the user's model is built, and the file's differing architecture is named.
    with pytest.raises(CheckpointError, match=r"different model.*num_embeddings: checkpoint 8000000, now 16"):
        cli_main([*common, "--ckpt_path", "last", *sum((["--model." + k, str(v)] for k, v in
                                                        [("latent_channels", 16), ("num_embeddings", 16),
                                                         ("embedding_dim", 16), ("num_res_blocks", 1)]), []),
                  "--model.encoder_channels", "[8, 16, 16, 16]", "--model.decoder_channels", "[16, 16, 16, 8]"])


@pytest.mark.parametrize("damage", ["flipped byte", "NaN weight"])
def test_broken_weights_are_refused_by_export_evaluate_and_encode(tmp_path: Path, damage: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Both used to export and evaluate with exit 0, and the export mapped every image to one code."""
    from animevq.tools import evaluate, export

    model = trained()
    if damage == "NaN weight":
        with torch.no_grad():
            model.tokenizer.decoder.last_layer[0, 0, 0, 0] = float("nan")
    ckpt = save_ckpt(model, tmp_path / "broken.ckpt")
    if damage == "flipped byte":
        flip_a_tensor_byte(ckpt)
    expected = "fails its CRC check" if damage == "flipped byte" else "holds non-finite values in decoder.head.2.weight"
    images = write_images(tmp_path / "images")
    runs = [(export.main, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")]),
            (evaluate.main, ["evaluate", "--ckpt", str(ckpt), "--data_dir", str(images), "--no_fid",
                             "--out", str(tmp_path / "eval"), "--image_size", str(SIZE), "--num_workers", "0"]),
            (codes.main, ["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(tmp_path / "t"),
                          "--image_size", str(SIZE), "--num_workers", "0", "--quiet"])]
    for main, argv in runs:
        assert main(argv) == 1, argv[0]
        err = capsys.readouterr().err.strip()
        assert expected in err and str(ckpt) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "export").exists() and not (tmp_path / "t").exists()
    # An export with a NaN weight is refused by the loader too.
    model.tokenizer.save_pretrained(tmp_path / "exported")
    if damage == "NaN weight":
        with pytest.raises(CheckpointError, match="non-finite values in decoder.head.2.weight"):
            Tokenizer.from_pretrained(tmp_path / "exported")
