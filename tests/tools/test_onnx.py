"""``animevq export --onnx``: encoder.onnx and decoder.onnx, run in onnxruntime against torch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from tooling import GOOD, SIZE, pixels

from animevq import Tokenizer, VQVAEModel
from animevq.tools import export

CODE_AGREEMENT = 0.99  # fraction of cells whose ONNX code equals torch's (near-ties may flip)
IMAGE_TOLERANCE = 1e-3  # max |ONNX − torch| of decoded pixels in [-1,1]
BATCHES = (3, 8)  # neither is the traced batch (2): the batch dimension must be dynamic


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_graphs_agree_with_torch_at_two_batch_sizes(model: VQVAEModel, ckpt: Path, images: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--onnx", "--image_size", str(SIZE)]) == 0
    assert f"{out}/encoder.onnx and {out}/decoder.onnx ({SIZE}x{SIZE} images, opset 20)" in capsys.readouterr().out
    names = ("model.safetensors", "config.json", "encoder.onnx", "decoder.onnx")
    assert len({(out / name).stat().st_mode & 0o777 for name in names}) == 1
    assert not list(out.glob(".*"))  # no temporary file left

    tokenizer = Tokenizer.from_pretrained(out)
    encoder, decoder = _session(out / "encoder.onnx"), _session(out / "decoder.onnx")
    assert [(i.name, i.type) for i in encoder.get_inputs()] == [("images", "tensor(float)")]
    assert [(i.name, i.type) for i in decoder.get_inputs()] == [("codes", "tensor(int64)")]
    drawings = torch.cat([pixels(images / name) for name in GOOD])  # (5,3,S,S)
    noise = torch.rand(BATCHES[1], 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batches = [torch.cat([drawings, noise])[: BATCHES[0]], noise]
    equal = cells = 0
    worst = 0.0
    for x in batches:  # (b,3,S,S) in [-1,1]
        codes = encoder.run(None, {"images": x.numpy()})[0]
        expected = tokenizer.encode(x)  # (b,h·w)
        assert codes.dtype == np.int64 and codes.shape == tuple(expected.shape) == (x.shape[0], 4)
        equal, cells = equal + int((torch.from_numpy(codes) == expected).sum()), cells + expected.numel()
        decoded = decoder.run(None, {"codes": expected.numpy()})[0]
        assert decoded.dtype == np.float32 and decoded.shape == tuple(x.shape)
        worst = max(worst, float((torch.from_numpy(decoded) - tokenizer.decode(expected)).abs().max()))
    assert equal / cells >= CODE_AGREEMENT, f"{equal}/{cells} codes agree"
    assert worst <= IMAGE_TOLERANCE, f"decoded images differ by up to {worst:.2e}"

    every_code = torch.arange(tokenizer.codebook_size).view(-1, 4)  # each of the K codes once, (K/4,h·w)
    decoded = decoder.run(None, {"codes": every_code.numpy()})[0]
    assert float((torch.from_numpy(decoded) - tokenizer.decode(every_code)).abs().max()) <= IMAGE_TOLERANCE
    with pytest.raises(Exception, match="out of data bounds"):  # a code ≥ K fails in the runtime
        decoder.run(None, {"codes": np.full((1, 4), tokenizer.codebook_size, np.int64)})
    assert model.tokenizer.weights_sha256() == tokenizer.weights_sha256()


def test_onnx_without_its_packages_fails_in_one_line_before_writing(ckpt: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what Python sees when it is not installed
    out = tmp_path / "out"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--onnx"]) == 1
    err = capsys.readouterr().err
    assert err == ('animevq export: error: --onnx needs onnx and onnxscript (not installed: onnxscript); '
                   'pip install "animevq[onnx]"\n')
    assert not out.exists()  # nothing written


def test_onnx_image_size_must_fit_the_downsampling(ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert export.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--onnx", "--image_size", "40"]) == 1
    err = capsys.readouterr().err
    assert "image_size 40 must be a positive multiple of 16" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
