"""Reconstruction metrics: PSNR/SSIM per image with the right data range, masked PSNR, rFID."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from animevq.runs.checkpoint_io import CheckpointError
from animevq.tools.metrics import (
    FID_WEIGHTS_FILE,
    FIDWeightsMissing,
    ReconstructionFID,
    background_cells,
    foreground_mask,
    masked_psnr,
    psnr,
    ssim,
)


def test_psnr_of_a_constant_offset() -> None:
    x = torch.rand(3, 3, 16, 16) * 0.8
    # MSE = 0.1² = 0.01 → PSNR = 10·log10(1 / 0.01) = 20 dB for every image.
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((3,), 20.0, dtype=torch.float64))


def test_psnr_is_averaged_per_image_not_over_the_batch() -> None:
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x + torch.tensor([0.1, 0.001]).view(2, 1, 1, 1)  # 20 dB and 60 dB
    per_image = psnr(x, y)
    # float32 inputs: 0.5 + 0.001 is exact to ~3e-8, i.e. 1e-4 dB at 60 dB
    torch.testing.assert_close(per_image, torch.tensor([20.0, 60.0], dtype=torch.float64), atol=1e-3, rtol=0)
    batch_as_one = 10 * math.log10(1 / ((0.1**2 + 0.001**2) / 2))  # ≈ 23 dB, dominated by the worse image
    assert per_image.mean().item() == pytest.approx(40.0, abs=1e-3)
    assert abs(per_image.mean().item() - batch_as_one) > 15


def test_data_range_is_honoured() -> None:
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(psnr(x * 255, y * 255, data_range=255.0), psnr(x, y))
    torch.testing.assert_close(ssim(x * 255, y * 255, data_range=255.0), ssim(x, y), atol=1e-5, rtol=0)
    # [0,255] images scored as if in [0,1]: PSNR drops by 20·log10(255) dB, SSIM changes.
    torch.testing.assert_close(psnr(x * 255, y * 255), psnr(x, y) - 20 * math.log10(255))
    assert (ssim(x * 255, y * 255) - ssim(x, y)).abs().min() > 1e-3


def test_ssim_is_one_for_identical_images_and_per_image() -> None:
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    y = x.clone()
    y[1] = (y[1] + 0.3 * torch.randn_like(y[1])).clamp(0, 1)  # only image 1 degraded
    values = ssim(x, y)
    assert values.shape == (3,)
    assert values[0] == pytest.approx(1.0) and values[2] == pytest.approx(1.0) and values[1] < 0.9


def _page(tolerance_noise: float = 0.0) -> torch.Tensor:
    """A 32×32 white page with an 8×8 coloured square at (8:16, 12:20): (1,3,32,32)."""
    x = torch.ones(1, 3, 32, 32)
    x += tolerance_noise * (torch.rand_like(x) * 2 - 1)  # JPEG-like ripple on the page
    x[:, :, 8:16, 12:20] = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1)
    return x.clamp(0, 1)


def test_foreground_mask_finds_the_drawing_despite_page_noise() -> None:
    mask, flat = foreground_mask(_page(tolerance_noise=2 / 255))
    expected = torch.zeros(1, 32, 32, dtype=torch.bool)
    expected[:, 8:16, 12:20] = True
    assert flat.tolist() == [True]
    assert torch.equal(mask, expected)


def test_masked_psnr_ignores_the_background() -> None:
    x = _page()
    y = x.clone()
    y[:, :, 20:, :] = 0.0  # the reconstruction ruins the page, not the drawing
    y[:, :, 8:16, 12:20] += 0.05  # and is off by 0.05 on the drawing
    expected = 10 * math.log10(1 / 0.05**2)  # ≈ 26 dB over the 64 foreground pixels only
    assert masked_psnr(x, y).item() == pytest.approx(expected, abs=1e-4)
    assert psnr(x, y).item() < 10  # the plain PSNR sees the ruined page
    # A mask computed once by the caller is used as given: the page's own, or one over the ruined rows.
    assert masked_psnr(x, y, foreground=foreground_mask(x)).item() == pytest.approx(expected, abs=1e-4)
    ruined = torch.zeros(1, 32, 32, dtype=torch.bool)
    ruined[:, 20:] = True
    assert masked_psnr(x, y, foreground=(ruined, torch.tensor([True]))).item() < 10


def test_masked_psnr_is_nan_without_a_flat_background() -> None:
    noise = torch.rand(2, 3, 32, 32)  # no border colour dominates
    values = masked_psnr(noise, noise.flip(0))
    assert values.isnan().all()


def test_background_cells_are_the_cells_without_any_drawing() -> None:
    # 8-px cells on the 32×32 page: the square (rows 8:16, cols 12:20) touches cells (1,1) and (1,2).
    cells = background_cells(_page(tolerance_noise=2 / 255), (4, 4))
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, 1, 1:3] = False
    assert torch.equal(cells, expected)
    # 16-px cells: the square lies in the top two.
    assert background_cells(_page(), (2, 2)).tolist() == [[[False, False], [True, True]]]
    # A precomputed mask is used as given: drawing everywhere leaves no background cell.
    everywhere = (torch.ones(1, 32, 32, dtype=torch.bool), torch.tensor([True]))
    assert not background_cells(_page(), (2, 2), foreground=everywhere).any()


def test_images_without_a_flat_background_have_no_background_cells() -> None:
    noise = torch.rand(2, 3, 32, 32)
    assert not background_cells(noise, (4, 4)).any()


def test_background_cells_need_a_grid_that_tiles_the_image() -> None:
    with pytest.raises(ValueError, match="3×3 code grid does not tile 32×32"):
        background_cells(_page(), (3, 3))


def _random_inception_file(folder: Path) -> Path:
    """torch-fidelity's FID Inception-v3 architecture with random weights, saved as a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # Build the architecture without its download/load step; He init keeps activations
    # from vanishing through ~50 random layers.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), mock.patch.object(
        fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
    ):
        net = fe.FeatureExtractorInceptionV3("random", ["64"])
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = folder / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) in float64 (Heusel et al. 2017, eq. 6)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_rfid_loads_inception_weights_from_a_local_file(tmp_path: Path) -> None:
    weights = _random_inception_file(tmp_path)
    x = torch.rand(6, 3, 32, 32)
    x_rec = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)

    same = ReconstructionFID(weights, feature=64)
    same.update(x, x)
    assert same.compute() == pytest.approx(0.0, abs=1e-3)
    cached = tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE  # torch-fidelity's own cache: used, not fetched
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    with mock.patch.object(torch.hub, "get_dir", lambda: str(tmp_path / "hub")):
        from_cache = ReconstructionFID(feature=64)
    from_cache.update(x, x)
    assert from_cache.compute() == pytest.approx(0.0, abs=1e-3)

    fid = ReconstructionFID(weights, feature=64)
    fid.update(x[:3], x_rec[:3])
    fid.update(x[3:], x_rec[3:])  # accumulates over batches
    with torch.no_grad():  # the metric's own network, fed the same uint8 images
        feats = [fid.metric.inception((t * 255).round().to(torch.uint8)).double().numpy() for t in (x, x_rec)]
    expected = _frechet_reference(*feats)
    assert expected > 1e-3
    assert fid.compute() == pytest.approx(expected, rel=1e-3)


def test_rfid_without_weights_says_how_to_provide_them(tmp_path: Path) -> None:
    with pytest.raises(FIDWeightsMissing, match="--fid_weights") as info:
        ReconstructionFID(tmp_path / "missing.pth")
    assert "--no_fid" in str(info.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # Not cached, and the download into the cache fails (here before any network: no cache folder).
    with mock.patch.object(torch.hub, "get_dir", lambda: str(blocker / "hub")):
        with pytest.raises(FIDWeightsMissing, match=r"does not exist and downloading it failed .*--no_fid"):
            ReconstructionFID()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_rfid_refuses_pickled_weights_and_wrong_architectures(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        ReconstructionFID(evil)
    assert not marker.exists()

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not fit torch-fidelity's FID Inception"):
        ReconstructionFID(wrong, feature=64)


def test_rfid_with_a_custom_feature_extractor_is_the_frechet_distance() -> None:
    class MeanColour(nn.Module):  # uint8 (B,3,H,W) → (B,6): channel means and stds
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float().flatten(2)
            return torch.cat([x.mean(2), x.std(2)], dim=1)

    x = torch.rand(10, 3, 16, 16)
    x_rec = (x * 0.7 + 0.1).clamp(0, 1)
    fid = ReconstructionFID(feature=MeanColour())
    fid.update(x, x_rec)
    feats = [MeanColour()((t * 255).round().to(torch.uint8)).double().numpy() for t in (x, x_rec)]
    assert fid.compute() == pytest.approx(_frechet_reference(*feats), rel=1e-4)
