"""``animevq evaluate``: per-image PSNR, SSIM, LPIPS and masked PSNR, rFID and code usage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import GOOD, SIZE, pixels
from torch import nn

from animevq import VQVAEModel
from animevq.nn.lpips import LPIPS
from animevq.nn.quantizers import code_stats
from animevq.tools import evaluate
from animevq.tools.metrics import ReconstructionFID, masked_psnr, ssim


class _MeanColour(nn.Module):
    """uint8 (B,3,H,W) → (B,6) channel means and stds: a tiny stand-in for Inception."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], dim=1)


def test_evaluate_reports_per_image_means(model: VQVAEModel, images: Path, tmp_path: Path) -> None:
    lpips = LPIPS(random_init=True)
    report = evaluate.evaluate(model.tokenizer, images, batch_size=2, image_size=SIZE, out_dir=tmp_path / "eval",
                               fid_metric=ReconstructionFID(feature=_MeanColour()), lpips_metric=lpips,
                               progress=False)
    x = torch.cat([pixels(images / name) for name in GOOD])  # (5,3,32,32)
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



def test_evaluate_replaces_links_in_out_instead_of_writing_through_them(model: VQVAEModel, images: Path,
                                                                        tmp_path: Path) -> None:
    """Each output is written beside its name and renamed over it: a link left in --out (or
    planted there) is replaced, and the file it points to keeps its bytes."""
    out = tmp_path / "eval"
    out.mkdir()
    precious = tmp_path / "precious.json"
    precious.write_text('{"keep": true}\n')
    for name in ("report.json", "samples.png", "code_usage.png"):
        (out / name).symlink_to(precious)
    report = evaluate.evaluate(model.tokenizer, images, batch_size=2, image_size=SIZE, out_dir=out,
                               compute_fid=False, lpips_metric=LPIPS(random_init=True), progress=False)
    assert precious.read_text() == '{"keep": true}\n'
    assert not any((out / name).is_symlink() for name in ("report.json", "samples.png", "code_usage.png"))
    assert json.loads((out / "report.json").read_text())["num_images"] == report["num_images"] == 5
    assert Image.open(out / "samples.png").format == "PNG"
    assert sorted(p.name for p in out.iterdir()) == ["code_usage.png", "report.json", "samples.png"]  # no temporaries


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
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # No cached VGG16 / Inception, and a cache folder that cannot be made: nothing is downloaded.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(blocker / "hub"))
    argv = ["evaluate", "--ckpt", str(ckpt), "--data_dir", str(images), "--out", str(tmp_path / "e"),
            "--image_size", str(SIZE), "--num_workers", "0", "--quiet"]
    assert evaluate.main(argv) == 0  # was: status 1, no report
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["rfid"] is None and report["lpips"] is None and math.isfinite(report["psnr"])
    assert any("--lpips_vgg_weights" in note for note in report["notes"])
    assert any(note.startswith("rFID skipped") and "--fid_weights PATH" in note for note in report["notes"])
    assert evaluate.main([*argv, "--no_fid"]) == 0
    assert "rFID skipped (--no_fid)" in json.loads((tmp_path / "e" / "report.json").read_text())["notes"]
    assert evaluate.main([*argv, "--fid_weights", str(tmp_path / "missing.pth")]) == 1  # asked for: an error
    err = capsys.readouterr().err
    assert "missing.pth does not exist" in err and "--no_fid" in err
