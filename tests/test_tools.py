"""Checkpoint loading, encode/decode/reconstruct and evaluate, on a tiny model and 32×32 images."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from animevq import cli, evaluate, tokenize
from animevq.checkpoint import TOKENIZER_PREFIXES, CheckpointError, load_model, weights_sha256
from animevq.lightning_module import VQVAEModel
from animevq.metrics import ReconstructionFID, masked_psnr, ssim
from animevq.nn.lpips import LPIPS
from animevq.nn.quantizer import code_stats

SIZE = 32  # images and model input: 2×2 code grids
GOOD = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]  # sorted like find_images
ROOT = Path(__file__).resolve().parents[1]


def _trained(kwargs: dict) -> VQVAEModel:
    model = VQVAEModel(**kwargs)
    with torch.no_grad():  # EMA updates: codebook and statistics differ from their init
        for _ in range(3):
            model(torch.rand(4, 3, SIZE, SIZE) * 2 - 1)
    return model.eval()


def _save_ckpt(model: VQVAEModel, path: Path, **extra: object) -> Path:
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
               "pytorch-lightning_version": lightning.__version__, **extra}
    torch.save(payload, path)
    return path


@pytest.fixture
def model(tiny_kwargs: dict) -> VQVAEModel:
    return _trained(tiny_kwargs)


@pytest.fixture
def ckpt(model: VQVAEModel, tmp_path: Path) -> Path:
    return _save_ckpt(model, tmp_path / "model.ckpt")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Five drawings on white pages (two in a subfolder) and one file that is not an image."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i, name in enumerate(GOOD):
        page = np.full((SIZE, SIZE, 3), 255, np.uint8)
        page[4 + i : 20 + i, 6:22] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(page).save(folder / name)
    (folder / "broken.png").write_text("<html>not a png</html>")
    return folder


def _pixels(path: Path) -> torch.Tensor:
    """An image file as (1,3,H,W) in [-1,1], read independently of animevq's loader."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


def _encode(ckpt: Path, images: Path, out: Path, *more: str) -> int:
    return tokenize.main(["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(out),
                          "--image_size", str(SIZE), "--num_workers", "0", "--quiet", *more])


# ------------------------------------------------------------------ checkpoints
def test_trainer_checkpoint_loads(tiny_kwargs: dict, tmp_path: Path) -> None:
    model = VQVAEModel(**tiny_kwargs)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.rand(4, 3, SIZE, SIZE) * 2 - 1, batch_size=2))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    loaded = load_model(tmp_path / "fit.ckpt")
    assert not loaded.training and loaded.lpips is None and loaded.batches_seen == 2
    for key, value in model.state_dict().items():
        if key.startswith(TOKENIZER_PREFIXES):
            assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert torch.equal(loaded.encode(x), model.eval().encode(x))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (str(self.marker), "w"))


def test_pickled_payload_is_refused_not_run(model: VQVAEModel, tmp_path: Path, images: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = _save_ckpt(model, tmp_path / "evil.ckpt", callbacks={"x": _Payload(marker)})
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*evil\.ckpt: it holds pickled Python"):
        load_model(evil)
    assert _encode(evil, images, tmp_path / "tokens") == 1
    assert "pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_checkpoint_errors_name_the_problem(model: VQVAEModel, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_model(tmp_path / "missing.ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a PyTorch file"):
        load_model(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_model(tmp_path / "plain.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nohp.ckpt")
    with pytest.raises(CheckpointError, match="has no 'hyper_parameters'"):
        load_model(tmp_path / "nohp.ckpt")

    state = dict(model.state_dict())
    state["extra.bias"] = state.pop("quantizer.embedding")
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, tmp_path / "keys.ckpt")
    keys = r"missing keys \(1\): quantizer\.embedding; unexpected keys \(1\): extra\.bias"
    with pytest.raises(CheckpointError, match=keys):
        load_model(tmp_path / "keys.ckpt")
    hparams = dict(model.hparams, num_embeddings=8)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "shape.ckpt")
    mismatch = r"shape mismatches \(\d+\): .*quantizer\.embedding: file \(16, 16\) vs model \(8, 16\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_model(tmp_path / "shape.ckpt")


# ------------------------------------------------------------------ encode / decode / reconstruct
def test_encode_then_decode_equals_the_reconstruction(model: VQVAEModel, ckpt: Path, images: Path,
                                                      tmp_path: Path) -> None:
    tokens, decoded = tmp_path / "tokens", tmp_path / "decoded"
    assert _encode(ckpt, images, tokens, "--shard_size", "2", "--batch_size", "3") == 0
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["files"] == GOOD and manifest["complete"]
    assert manifest["skipped"] == [{"file": "broken.png", "reason": "not_an_image", "shard": 1}]
    assert manifest["grid"] == [2, 2] and manifest["num_embeddings"] == 16 and manifest["image_size"] == SIZE
    assert manifest["model_sha256"] == weights_sha256(model)
    shards = [np.load(tokens / s["name"]) for s in manifest["shards"]]
    assert [s["name"] for s in manifest["shards"]] == ["codes-00000.npy", "codes-00001.npy", "codes-00002.npy"]
    assert [a.shape[0] for a in shards] == [2, 1, 2]  # shard 1 = broken.png + c.png
    codes = torch.from_numpy(np.concatenate(shards)).long()  # (5,2,2)
    assert shards[0].dtype == np.int16

    x = torch.cat([_pixels(images / name) for name in GOOD])
    assert torch.equal(codes.flatten(1), model.encode(x))
    with torch.no_grad():
        x_rec = model(x).reconstruction
    torch.testing.assert_close(model.decode(codes), x_rec, atol=1e-5, rtol=0)

    assert tokenize.main(["decode", "--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(decoded),
                          "--batch_size", "2", "--quiet"]) == 0
    expected = ((x_rec.clamp(-1, 1) + 1) * 127.5).round()
    for i, name in enumerate(GOOD):
        png = torch.from_numpy(np.array(Image.open(decoded / name))).permute(2, 0, 1).float()
        assert (png - expected[i]).abs().max() <= 1, name


def _counting(model: VQVAEModel) -> list[int]:
    seen: list[int] = []
    encode = model.encode

    def counted(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return encode(x)

    model.encode = counted  # type: ignore[method-assign]
    return seen


def test_encode_resumes_after_the_last_good_shard(model: VQVAEModel, tiny_kwargs: dict, images: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    options = dict(image_size=SIZE, batch_size=2, shard_size=2, progress=False)
    full = tokenize.encode_folder(model, images, out, **options)
    original = {p.name: p.read_bytes() for p in out.iterdir()}

    seen = _counting(model)
    assert tokenize.encode_folder(model, images, out, **options) == full
    assert seen == []  # every shard verified, nothing re-encoded

    # Interrupted after shard 0: the manifest lists one shard, later files are gone or half-written.
    kept = full["shards"][0]["count"]
    interrupted = dict(full, shards=full["shards"][:1], files=full["files"][:kept], complete=False)
    (out / "manifest.json").write_text(json.dumps(interrupted))
    (out / "codes-00001.npy").unlink()
    (out / "codes-00002.npy").write_bytes(b"half")
    assert tokenize.encode_folder(model, images, out, **options) == full
    assert sum(seen) == 3  # c.png, sub/d.png, sub/e.png; shard 0 (a.png, b.png) kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == original

    # A shard changed on disk fails its checksum and is redone with every later one.
    seen.clear()
    (out / "codes-00001.npy").write_bytes(original["codes-00000.npy"])
    assert tokenize.encode_folder(model, images, out, **options) == full
    assert sum(seen) == 3

    with pytest.raises(ValueError, match=r"already holds codes made with other settings \(model_sha256"):
        tokenize.encode_folder(_trained(tiny_kwargs), images, out, **options)
    with pytest.raises(ValueError, match="image_size: 32 → 64"):
        tokenize.encode_folder(model, images, out, **dict(options, image_size=64))


def test_decode_refuses_tokens_of_another_model(model: VQVAEModel, tiny_kwargs: dict, ckpt: Path,
                                                images: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens"
    assert _encode(ckpt, images, tokens) == 0
    bigger = _save_ckpt(_trained(dict(tiny_kwargs, num_embeddings=32)), tmp_path / "k32.ckpt")
    retrained = _save_ckpt(_trained(tiny_kwargs), tmp_path / "other.ckpt")
    for other, message in ((bigger, "codebook of 16 codes but the model has 32"),
                           (retrained, "were made by a model with weights sha256")):
        rc = tokenize.main(["decode", "--ckpt", str(other), "--tokens", str(tokens), "--out", str(tmp_path / "o")])
        assert rc == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # The export of the encoding checkpoint has the same weights: it may decode them.
    from animevq.export import export_pretrained

    export_pretrained(model, tmp_path / "exported")
    rc = tokenize.main(["decode", "--ckpt", str(tmp_path / "exported"), "--tokens", str(tokens),
                        "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0 and len(list((tmp_path / "o").rglob("*.png"))) == len(GOOD)


def test_folder_and_output_errors(ckpt: Path, images: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["encode", "--data_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "t")], "holds no images"),
        (["encode", "--data_dir", str(tmp_path / "absent"), "--out", str(tmp_path / "t")], "does not exist"),
        (["encode", "--data_dir", str(images), "--out", str(blocker / "t")], "cannot write to --out"),
        (["encode", "--data_dir", str(images), "--out", str(tmp_path / "t"), "--image_size", "40"],
         "image_size 40 must be a positive multiple of 16"),
        (["decode", "--tokens", str(images), "--out", str(tmp_path / "d")], "holds no manifest.json"),
        (["reconstruct", "--input", str(blocker), "--out", str(tmp_path / "r")], "is not an image file"),
    ]
    for argv, message in cases:
        rc = tokenize.main([argv[0], "--ckpt", str(ckpt), "--num_workers", "0", *argv[1:]]
                           if argv[0] != "decode" else [argv[0], "--ckpt", str(ckpt), *argv[1:]])
        assert rc == 1, argv
        assert message in capsys.readouterr().err, argv
    rc = evaluate.main(["evaluate", "--ckpt", str(ckpt), "--data_dir", str(tmp_path / "empty"), "--no_fid"])
    assert rc == 1 and "holds no images" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    shutil.copy(images / "broken.png", tmp_path / "bad" / "broken.png")
    rc = evaluate.main(["evaluate", "--ckpt", str(ckpt), "--data_dir", str(tmp_path / "bad"), "--no_fid",
                        "--out", str(tmp_path / "e"), "--num_workers", "0", "--image_size", str(SIZE)])
    assert rc == 1 and "none of the 1 image files" in capsys.readouterr().err


def test_reconstruct_file_and_folder(model: VQVAEModel, ckpt: Path, images: Path, tmp_path: Path) -> None:
    common = ["--ckpt", str(ckpt), "--image_size", str(SIZE), "--num_workers", "0", "--quiet"]
    assert tokenize.main(["reconstruct", "--input", str(images / "sub" / "d.png"), "--out", str(tmp_path / "one"),
                          *common]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["d.png"]
    with torch.no_grad():
        expected = ((model(_pixels(images / "sub" / "d.png")).reconstruction[0] + 1) * 127.5).round()
    png = torch.from_numpy(np.array(Image.open(tmp_path / "one" / "d.png"))).permute(2, 0, 1).float()
    assert (png - expected).abs().max() <= 1

    shutil.copy(images / "a.png", images / "a.jpg.png")  # unrelated name, no collision
    Image.open(images / "b.png").save(images / "b.webp", lossless=True)  # collides with b.png
    assert tokenize.main(["reconstruct", "--input", str(images), "--out", str(tmp_path / "all"), *common]) == 0
    written = sorted(p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*.png"))
    assert written == ["a.jpg.png", "a.png", "b.png.png", "b.webp.png", "c.png", "sub/d.png", "sub/e.png"]


# ------------------------------------------------------------------ evaluate
class _MeanColour(nn.Module):
    """uint8 (B,3,H,W) → (B,6) channel means and stds: a tiny stand-in for Inception."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], dim=1)


def test_evaluate_reports_per_image_means(model: VQVAEModel, images: Path, tmp_path: Path) -> None:
    lpips = LPIPS(random_init=True)
    report = evaluate.evaluate(model, images, batch_size=2, image_size=SIZE, out_dir=tmp_path / "eval",
                               fid_metric=ReconstructionFID(feature=_MeanColour()), lpips_metric=lpips,
                               progress=False)
    x = torch.cat([_pixels(images / name) for name in GOOD])  # (5,3,32,32)
    with torch.no_grad():
        out = model(x)
    x01, rec01 = (x + 1) / 2, (out.reconstruction.clamp(-1, 1) + 1) / 2
    mse = ((x01.double() - rec01.double()) ** 2).flatten(1).mean(1).numpy()
    assert report["num_images"] == 5
    assert report["skipped"] == [{"file": "broken.png", "reason": "not_an_image"}]
    assert report["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-6)
    assert report["ssim"] == pytest.approx(float(np.mean([ssim(x01[i:i + 1], rec01[i:i + 1]).item()
                                                          for i in range(5)])), abs=1e-5)
    assert report["lpips"] == pytest.approx(lpips(x, out.reconstruction).mean().item(), rel=1e-4)
    assert report["masked_psnr"] == pytest.approx(masked_psnr(x01, rec01).mean().item(), rel=1e-6)
    assert report["masked_psnr_images"] == 5
    counts = torch.bincount(model.encode(x).flatten(), minlength=16).float()
    perplexity, usage = code_stats(counts)
    assert report["perplexity"] == pytest.approx(perplexity.item(), rel=1e-5)
    assert report["code_usage_rate"] == pytest.approx(usage.item())
    assert report["codes_used"] == int((counts > 0).sum())
    # every drawing reaches into all four 16-px cells: no background cell, foreground = all
    assert report["background_cell_fraction"] == 0.0 and report["background_codes_used"] == 0
    assert report["foreground_perplexity"] == pytest.approx(report["perplexity"], rel=1e-12)
    reference = ReconstructionFID(feature=_MeanColour())
    reference.update(x01, rec01)
    assert report["rfid"] == pytest.approx(reference.compute(), rel=1e-4)

    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == json.loads(json.dumps(report))
    samples = np.array(Image.open(tmp_path / "eval" / "samples.png"))
    assert samples.shape == (2 * SIZE + 3 * 2, 5 * SIZE + 6 * 2, 3)  # 2 rows × 5 images, 2 px padding
    assert Image.open(tmp_path / "eval" / "code_usage.png").size == (512, 256)


def test_code_tally_splits_drawing_from_background_cells() -> None:
    page = torch.ones(1, 3, 32, 32)
    page[:, :, 2:10, 3:12] = 0.3  # a drawing in the top-left 16-px cell only
    noise = torch.rand(1, 3, 32, 32)  # no flat background: every cell counts as drawing
    tally = evaluate.CodeTally(8)
    tally.update(torch.tensor([[[3, 0], [0, 0]]]), page)
    tally.update(torch.tensor([[[1, 2], [3, 3]]]), noise)
    report = tally.report()
    def perplexity(counts: list[float]) -> float:
        p = np.array(counts) / sum(counts)
        return float(np.exp(-(p * np.log(p)).sum()))
    # foreground cells: codes 3, 1, 2, 3, 3; background: code 0 three times
    assert report["foreground_perplexity"] == pytest.approx(perplexity([3, 1, 1]))
    assert report["foreground_code_usage_rate"] == 3 / 8
    assert report["perplexity"] == pytest.approx(perplexity([3, 1, 1, 3]))
    assert report["code_usage_rate"] == 4 / 8 and report["codes_used"] == 4
    assert report["background_cell_fraction"] == 3 / 8
    assert report["background_codes_used"] == 1


def test_evaluate_without_weights(ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached VGG16 / Inception
    argv = ["evaluate", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(tmp_path / "e"),
            "--image_size", str(SIZE), "--num_workers", "0", "--quiet"]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "--fid_weights PATH" in err and "--no_fid" in err
    assert evaluate.main([*argv, "--no_fid"]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["rfid"] is None and report["lpips"] is None and math.isfinite(report["psnr"])
    assert any("--lpips_vgg_weights" in note for note in report["notes"])


# ------------------------------------------------------------------ the command line
def test_commands_route_through_the_cli(ckpt: Path, images: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for command, flag in (("encode", "--shard_size"), ("decode", "--tokens"), ("reconstruct", "--input"),
                          ("evaluate", "--fid_weights")):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0 and flag in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["decode", "--ckpt", str(tmp_path / "gone.ckpt"), "--tokens", str(tmp_path), "--out", str(tmp_path)])
    assert done.value.code == 1 and "gone.ckpt does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_encode_as_a_user_runs_it(ckpt: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    result = subprocess.run(
        [sys.executable, "-m", "animevq.cli", "encode", "--ckpt", str(ckpt), "--data_dir", str(images),
         "--out", str(out), "--image_size", str(SIZE), "--num_workers", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "encoded 5 images into 1 shard(s)" in result.stdout and "skipped 1" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == GOOD and np.load(out / "codes-00000.npy").shape == (5, 2, 2)
