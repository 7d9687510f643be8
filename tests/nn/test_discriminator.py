"""Tests for the PatchGAN discriminator (animevq.nn.discriminator)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from animevq.nn.discriminator import PatchDiscriminator, min_input_size, patch_grid_size

NORMS = ("batch", "group", "none", "spectral")


def _convs(disc: PatchDiscriminator) -> list[nn.Conv2d]:
    return [m for m in disc.modules() if isinstance(m, nn.Conv2d)]


def test_default_256px_gives_30x30_logits() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    logits = disc(torch.randn(2, 3, 256, 256))
    assert logits.shape == (2, 1, 30, 30)
    assert patch_grid_size(256) == 30


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 64), (32, 64)])
def test_tiny_shapes_for_every_norm(norm: str, height: int, width: int) -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, norm=norm)
    logits = disc(torch.randn(3, 3, height, width))
    # Three stride-2 4×4 convs (÷8), then two stride-1 4×4 convs with padding 1 (−1 each).
    expected = (3, 1, height // 8 - 2, width // 8 - 2)
    assert logits.shape == expected
    assert torch.isfinite(logits).all()


def test_channel_layout_doubles_and_caps_at_eight_times_base() -> None:
    disc = PatchDiscriminator(in_channels=4, base_channels=4, num_layers=5, norm="none")
    widths = [(c.in_channels, c.out_channels) for c in _convs(disc)]
    assert widths == [(4, 4), (4, 8), (8, 16), (16, 32), (32, 32), (32, 32), (32, 1)]
    strides = [c.stride for c in _convs(disc)]
    assert strides == [(2, 2)] * 5 + [(1, 1)] * 2


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_normalised_convs_carry_no_bias(norm: str) -> None:
    convs = _convs(PatchDiscriminator(base_channels=8, norm=norm))
    # The norm's shift makes a bias redundant; first and last conv keep theirs.
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_dcgan_initialisation_statistics(norm: str) -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(norm=norm)  # full size: enough weights for tight statistics
    big = [c for c in _convs(disc) if c.weight.numel() >= 100_000]
    assert len(big) == 3
    for conv in big:
        assert abs(conv.weight.mean().item()) < 1e-3
        assert conv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for conv in _convs(disc):
        if conv.bias is not None:
            assert torch.count_nonzero(conv.bias) == 0
    norms = [m for m in disc.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert [m.num_features if norm == "batch" else m.num_channels for m in norms] == [
        128,
        256,
        512,
    ]
    scales = torch.cat([m.weight.detach() for m in norms])  # 896 values
    assert scales.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.count_nonzero(torch.cat([m.bias.detach() for m in norms])) == 0


def test_spectral_norm_bounds_each_conv_operator() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, norm="spectral")
    for conv in _convs(disc):
        original = conv.parametrizations.weight.original
        assert original.std().item() == pytest.approx(0.02, rel=0.35)  # DCGAN init kept
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, rel=0.05)


def test_each_logit_sees_a_70px_patch() -> None:
    # 3-layer PatchGAN: receptive field 70 px, stride 8, offset −23 px from the padding
    # (1 + 2 + 4 + 8 + 8), so logit i sees input rows [8i − 23, 8i + 46]. A single pixel at
    # row/column 60 must change exactly logits 2…10 in each direction and nothing else.
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, norm="none").eval()
    x = torch.randn(1, 3, 128, 128)
    y = x.clone()
    y[..., 60, 60] += 5.0
    changed = (disc(y) - disc(x))[0, 0] != 0  # (14,14)
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[2:11, 2:11] = True
    assert torch.equal(changed, expected)


def test_group_norm_is_batch_independent_batch_norm_is_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    group = PatchDiscriminator(base_channels=8, norm="group").train()
    torch.testing.assert_close(group(x)[:1], group(x[:1]), rtol=1e-5, atol=1e-5)
    batch = PatchDiscriminator(base_channels=8, norm="batch").train()
    assert not torch.allclose(batch(x)[:1], batch(x[:2])[:1], atol=1e-4)


def test_gradients_reach_the_input_image() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, norm="group")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


def test_too_small_input_raises_with_minimum_size() -> None:
    disc = PatchDiscriminator(base_channels=8)
    assert min_input_size(3) == 24
    assert disc(torch.randn(2, 3, 24, 24)).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="23×23 px is too small.*at least 24 px"):
        disc(torch.randn(2, 3, 23, 23))
    with pytest.raises(ValueError, match="at least 12 px"):
        PatchDiscriminator(base_channels=8, num_layers=2)(torch.randn(1, 3, 8, 8))


def test_bad_arguments_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"norm='layer'.*'batch', 'group', 'none', 'spectral'"):
        PatchDiscriminator(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        PatchDiscriminator(num_layers=0)


def test_batch_norm_converts_to_sync_batch_norm_for_ddp() -> None:
    disc = nn.SyncBatchNorm.convert_sync_batchnorm(PatchDiscriminator(base_channels=8))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in disc.modules()) == 3
    assert not any(type(m) is nn.BatchNorm2d for m in disc.modules())
