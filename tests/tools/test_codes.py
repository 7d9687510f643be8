"""``animevq encode``, ``decode`` and ``reconstruct``, and the tools' command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import GOOD, SIZE, pixels, save_ckpt, trained

from animevq import Tokenizer, VQVAEModel, cli
from animevq.tools import codes, evaluate

ROOT = Path(__file__).resolve().parents[2]


def encode_command(ckpt: Path, images: Path, out: Path, *more: str) -> int:
    return codes.main(["encode", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(out),
                       "--image_size", str(SIZE), "--num_workers", "0", "--quiet", *more])


# ------------------------------------------------------------------ encode / decode / reconstruct
def test_encode_then_decode_equals_the_reconstruction(model: VQVAEModel, ckpt: Path, images: Path,
                                                      tmp_path: Path) -> None:
    tokens, decoded = tmp_path / "tokens", tmp_path / "decoded"
    assert encode_command(ckpt, images, tokens, "--shard_size", "2", "--batch_size", "3") == 0
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["files"] == GOOD and manifest["complete"]
    assert manifest["skipped"] == [{"file": "broken.png", "reason": "not_an_image", "shard": 1}]
    assert manifest["grid"] == [2, 2] and manifest["num_embeddings"] == 16 and manifest["image_size"] == SIZE
    assert manifest["model_sha256"] == model.tokenizer.weights_sha256()
    shards = [np.load(tokens / s["name"]) for s in manifest["shards"]]
    assert [s["name"] for s in manifest["shards"]] == ["codes-00000.npy", "codes-00001.npy", "codes-00002.npy"]
    assert [a.shape[0] for a in shards] == [2, 1, 2]  # shard 1 = broken.png + c.png
    grids = torch.from_numpy(np.concatenate(shards)).long()  # (5,2,2)
    assert shards[0].dtype == np.int16

    x = torch.cat([pixels(images / name) for name in GOOD])
    assert torch.equal(grids.flatten(1), model.encode(x))
    with torch.no_grad():
        x_rec = model(x).reconstruction
    torch.testing.assert_close(model.decode(grids), x_rec, atol=1e-5, rtol=0)

    assert codes.main(["decode", "--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(decoded),
                          "--batch_size", "2", "--quiet"]) == 0
    expected = ((x_rec.clamp(-1, 1) + 1) * 127.5).round()
    for i, name in enumerate(GOOD):
        png = torch.from_numpy(np.array(Image.open(decoded / name))).permute(2, 0, 1).float()
        assert (png - expected[i]).abs().max() <= 1, name


def _counting(tokenizer: Tokenizer) -> list[int]:
    seen: list[int] = []
    encode = tokenizer.encode

    def counted(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return encode(x)

    tokenizer.encode = counted  # type: ignore[method-assign]
    return seen


def test_encode_resumes_after_the_last_good_shard(model: VQVAEModel, images: Path, tmp_path: Path) -> None:
    tokenizer = model.tokenizer
    out = tmp_path / "tokens"
    options = dict(image_size=SIZE, batch_size=2, shard_size=2, progress=False)
    full = codes.encode_folder(tokenizer, images, out, **options)
    original = {p.name: p.read_bytes() for p in out.iterdir()}

    seen = _counting(tokenizer)
    assert codes.encode_folder(tokenizer, images, out, **options) == full
    assert seen == []  # every shard verified, nothing re-encoded

    # Interrupted after shard 0: the manifest lists one shard, later files are gone or half-written.
    kept = full["shards"][0]["count"]
    interrupted = dict(full, shards=full["shards"][:1], files=full["files"][:kept], complete=False)
    (out / "manifest.json").write_text(json.dumps(interrupted))
    (out / "codes-00001.npy").unlink()
    (out / "codes-00002.npy").write_bytes(b"half")
    assert codes.encode_folder(tokenizer, images, out, **options) == full
    assert sum(seen) == 3  # c.png, sub/d.png, sub/e.png; shard 0 (a.png, b.png) kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == original

    # A shard changed on disk fails its checksum and is redone with every later one.
    seen.clear()
    (out / "codes-00001.npy").write_bytes(original["codes-00000.npy"])
    assert codes.encode_folder(tokenizer, images, out, **options) == full
    assert sum(seen) == 3

    with pytest.raises(ValueError, match=r"already holds codes made with other settings \(model_sha256"):
        codes.encode_folder(trained().tokenizer, images, out, **options)
    with pytest.raises(ValueError, match="image_size: 32 → 64"):
        codes.encode_folder(tokenizer, images, out, **dict(options, image_size=64))


def test_decode_refuses_tokens_of_another_model(model: VQVAEModel, ckpt: Path, images: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens"
    assert encode_command(ckpt, images, tokens) == 0
    bigger = save_ckpt(trained(num_embeddings=32), tmp_path / "k32.ckpt")
    retrained = save_ckpt(trained(), tmp_path / "other.ckpt")
    for other, message in ((bigger, "codebook of 16 codes but the model has 32"),
                           (retrained, "were made by a model with weights sha256")):
        rc = codes.main(["decode", "--ckpt", str(other), "--tokens", str(tokens), "--out", str(tmp_path / "o")])
        assert rc == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # The export of the encoding checkpoint has the same weights: it may decode them.
    model.tokenizer.save_pretrained(tmp_path / "exported")
    rc = codes.main(["decode", "--ckpt", str(tmp_path / "exported"), "--tokens", str(tokens),
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
        rc = codes.main([argv[0], "--ckpt", str(ckpt), "--num_workers", "0", *argv[1:]]
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
    assert codes.main(["reconstruct", "--input", str(images / "sub" / "d.png"), "--out", str(tmp_path / "one"),
                          *common]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["d.png"]
    with torch.no_grad():
        expected = ((model(pixels(images / "sub" / "d.png")).reconstruction[0] + 1) * 127.5).round()
    png = torch.from_numpy(np.array(Image.open(tmp_path / "one" / "d.png"))).permute(2, 0, 1).float()
    assert (png - expected).abs().max() <= 1

    shutil.copy(images / "a.png", images / "a.jpg.png")  # unrelated name, no collision
    Image.open(images / "b.png").save(images / "b.webp", lossless=True)  # collides with b.png
    assert codes.main(["reconstruct", "--input", str(images), "--out", str(tmp_path / "all"), *common]) == 0
    written = sorted(p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*.png"))
    assert written == ["a.jpg.png", "a.png", "b.png.png", "b.webp.png", "c.png", "sub/d.png", "sub/e.png"]


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
