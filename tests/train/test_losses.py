"""Tests for the adversarial losses (animevq.losses), against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from animevq.train.losses import (
    LeCamEMA,
    adaptive_weight,
    d_loss,
    generator_loss,
    hinge_d_loss,
    lecam_loss,
    nonsaturating_d_loss,
    ramp_weight,
)

REAL = [2.0, -0.5]
FAKE = [0.5, -3.0]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def logits(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --- discriminator and generator losses -------------------------------------------------


def test_hinge_d_loss_value() -> None:
    real_term = (max(0.0, 1 - 2.0) + max(0.0, 1 + 0.5)) / 2  # relu(1 − real): 0, 1.5
    fake_term = (max(0.0, 1 + 0.5) + max(0.0, 1 - 3.0)) / 2  # relu(1 + fake): 1.5, 0
    expected = 0.5 * (real_term + fake_term)  # 0.75
    assert hinge_d_loss(logits(REAL), logits(FAKE)).item() == pytest.approx(expected, rel=1e-6)
    assert d_loss(logits(REAL), logits(FAKE), "hinge").item() == pytest.approx(expected, rel=1e-6)


def test_hinge_d_loss_gradient_only_from_margin_violations() -> None:
    real = logits(REAL).requires_grad_()
    fake = logits(FAKE).requires_grad_()
    hinge_d_loss(real, fake).backward()
    # d/dreal = −0.5/n where 1 − real > 0; d/dfake = +0.5/n where 1 + fake > 0 (n = 2).
    torch.testing.assert_close(real.grad, torch.tensor([0.0, -0.25]))
    torch.testing.assert_close(fake.grad, torch.tensor([0.25, 0.0]))


def test_nonsaturating_d_loss_value() -> None:
    real_term = (softplus(-2.0) + softplus(0.5)) / 2  # −log σ(real)
    fake_term = (softplus(0.5) + softplus(-3.0)) / 2  # −log(1 − σ(fake))
    expected = 0.5 * (real_term + fake_term)
    got = nonsaturating_d_loss(logits(REAL), logits(FAKE)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    via_bce = 0.5 * (
        torch.nn.functional.binary_cross_entropy_with_logits(logits(REAL), torch.ones(2))
        + torch.nn.functional.binary_cross_entropy_with_logits(logits(FAKE), torch.zeros(2))
    )
    assert got == pytest.approx(via_bce.item(), rel=1e-6)
    assert d_loss(logits(REAL), logits(FAKE), "nonsaturating").item() == pytest.approx(expected)


def test_generator_loss_values() -> None:
    assert generator_loss(logits(FAKE)).item() == pytest.approx(-(0.5 - 3.0) / 2)  # 1.25
    expected_ns = (softplus(-0.5) + softplus(3.0)) / 2  # −log σ(fake)
    got = generator_loss(logits(FAKE), "nonsaturating").item()
    assert got == pytest.approx(expected_ns, rel=1e-6)


def test_losses_on_patch_maps_average_every_element() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    flat = hinge_d_loss(real.flatten(), fake.flatten())
    assert hinge_d_loss(real, fake).item() == pytest.approx(flat.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_upcast_half_precision_logits(dtype: torch.dtype) -> None:
    real, fake = logits(REAL, dtype), logits(FAKE, dtype)
    for kind in ("hinge", "nonsaturating"):
        d, g = d_loss(real, fake, kind), generator_loss(fake, kind)
        assert d.dtype == g.dtype == torch.float32
        # REAL/FAKE are exact in 16 bits, so the float32 math gives the float32 result.
        assert d.item() == pytest.approx(d_loss(logits(REAL), logits(FAKE), kind).item(), rel=1e-6)
        assert g.item() == pytest.approx(generator_loss(logits(FAKE), kind).item(), rel=1e-6)


def test_bad_kind_lists_valid_kinds() -> None:
    message = r"unknown GAN loss kind 'wgan'; valid kinds are \('hinge', 'nonsaturating'\)"
    with pytest.raises(ValueError, match=message):
        d_loss(logits(REAL), logits(FAKE), "wgan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        generator_loss(logits(FAKE), "wgan")  # type: ignore[arg-type]


# --- adaptive weight ----------------------------------------------------------------------


def _toy_graph(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([1.0, 2.0], dtype=w.dtype)
    nll = (w * a).sum() ** 2  # ∇_w = 2 (w·a) a
    g = (3 * w).sum()  # ∇_w = (3, 3)
    return nll, g


def test_adaptive_weight_matches_analytic_gradients() -> None:
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    nll, g = _toy_graph(w)
    # w·a = −1.5, so ∇nll = (−3, −6) with norm 3√5; ‖∇g‖ = 3√2.
    expected = 3 * math.sqrt(5) / (3 * math.sqrt(2) + 1e-4)
    weight = adaptive_weight(nll, g, w)
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    assert weight.dtype == torch.float32 and weight.dim() == 0


def test_adaptive_weight_is_detached_and_leaves_graph_usable() -> None:
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    nll, g = _toy_graph(w)
    weight = adaptive_weight(nll, g, w)
    assert not weight.requires_grad
    assert w.grad is None  # autograd.grad writes nothing to .grad
    (nll + weight * g).backward()  # would raise if the graph had been freed
    expected_grad = torch.tensor([-3.0, -6.0]) + weight * torch.tensor([3.0, 3.0])
    torch.testing.assert_close(w.grad, expected_grad)


def test_adaptive_weight_clamps_to_max_weight() -> None:
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    nll, _ = _toy_graph(w)
    tiny_g = (1e-6 * w).sum()  # weight ≈ 3√5 / (1.4e-6 + 1e-4) ≈ 6.6e4
    assert adaptive_weight(nll, tiny_g, w, max_weight=10.0).item() == 10.0
    assert adaptive_weight(nll, tiny_g, w).item() == 1e4  # taming's default clamp


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_adaptive_weight_non_finite_gradient_gives_zero(bad: float) -> None:
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    nll = (w * bad).sum()
    g = (3 * w).sum()
    weight = adaptive_weight(nll, g, w)
    assert weight.item() == 0.0


def test_adaptive_weight_norms_in_float32() -> None:
    # Each gradient entry fits float16 but the norm 6e4·√2 ≈ 8.5e4 overflows it (max 65504).
    w = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    nll = (w * 6e4).sum()
    g = w.sum()
    weight = adaptive_weight(nll, g, w, max_weight=1e6)
    expected = 6e4 * math.sqrt(2) / (math.sqrt(2) + 1e-4)
    assert weight.dtype == torch.float32
    assert weight.item() == pytest.approx(expected, rel=1e-3)


# --- LeCam regularisation -----------------------------------------------------------------


def test_lecam_loss_value_and_gradient() -> None:
    real = logits(REAL).requires_grad_()
    fake = logits(FAKE).requires_grad_()
    ema_real = torch.tensor(1.0, requires_grad=True)
    ema_fake = torch.tensor(-1.0, requires_grad=True)
    # relu(real − α_F)² = (3², 0.5²); relu(α_R − fake)² = (0.5², 4²)
    expected = (9.0 + 0.25) / 2 + (0.25 + 16.0) / 2
    loss = lecam_loss(real, fake, ema_real, ema_fake)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dreal = 2·relu(real − α_F)/n; d/dfake = −2·relu(α_R − fake)/n; anchors get nothing.
    torch.testing.assert_close(real.grad, torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(fake.grad, torch.tensor([-0.5, -4.0]))
    assert ema_real.grad is None and ema_fake.grad is None


def test_lecam_loss_zero_inside_anchors_and_accepts_floats() -> None:
    loss = lecam_loss(logits([0.0, -1.0]), logits([2.0, 3.0]), 1.0, 0.5)
    assert loss.item() == 0.0


def test_lecam_ema_update() -> None:
    ema = LeCamEMA(decay=0.9)
    assert ema.ema_real.item() == 0.0 and ema.ema_fake.item() == 0.0
    real = logits(REAL, torch.bfloat16).requires_grad_()  # mean 0.75
    fake = logits(FAKE, torch.bfloat16)  # mean −1.25
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.1 * 0.75)
    assert ema.ema_fake.item() == pytest.approx(0.1 * -1.25)
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.9 * 0.075 + 0.1 * 0.75)
    assert ema.ema_fake.item() == pytest.approx(0.9 * -0.125 + 0.1 * -1.25)
    assert ema.ema_real.dtype == ema.ema_fake.dtype == torch.float32
    assert not ema.ema_real.requires_grad
    assert set(ema.state_dict()) == {"ema_real", "ema_fake"}


def test_lecam_ema_default_decay_and_validation() -> None:
    ema = LeCamEMA()
    ema.update(logits([1.0]), logits([-1.0]))
    assert ema.ema_real.item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\), got 1.0"):
        LeCamEMA(decay=1.0)


def _lecam_rank(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ema = LeCamEMA(decay=0.5)
        # Rank 0 sees real mean 1, fake mean −2; rank 1 real mean 3, fake mean 0.
        ema.update(torch.full((4,), 1.0 + 2 * rank), torch.full((4,), -2.0 + 2 * rank))
        results[rank] = (ema.ema_real.item(), ema.ema_fake.item())
    finally:
        dist.destroy_process_group()


def test_lecam_ema_averages_over_ranks(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_lecam_rank, args=(str(tmp_path / "init"), results), nprocs=2)
        # Global means: real 2, fake −1; decay 0.5 from 0 -> (1, −0.5) on both ranks.
        assert dict(results) == {0: (1.0, -0.5), 1: (1.0, -0.5)}


# --- schedules ------------------------------------------------------------------------------


def test_ramp_weight_edges() -> None:
    assert ramp_weight(0, start=10, ramp_steps=4) == 0.0
    assert ramp_weight(9, start=10, ramp_steps=4) == 0.0
    assert ramp_weight(10, start=10, ramp_steps=4) == 0.25  # on from `start`
    assert ramp_weight(11, start=10, ramp_steps=4) == 0.5
    assert ramp_weight(13, start=10, ramp_steps=4) == 1.0  # full after ramp_steps batches
    assert ramp_weight(10_000, start=10, ramp_steps=4) == 1.0
    assert ramp_weight(9, start=10, ramp_steps=0) == 0.0
    assert ramp_weight(10, start=10, ramp_steps=0) == 1.0  # hard switch, like taming
    assert ramp_weight(0, start=0, ramp_steps=0) == 1.0
    with pytest.raises(ValueError, match="ramp_steps=-1"):
        ramp_weight(5, start=0, ramp_steps=-1)
