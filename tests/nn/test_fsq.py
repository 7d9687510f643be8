"""FSQ's maths against float64 references: the bound, the rounding, the index bijection."""

from __future__ import annotations

import math

import pytest
import torch

from gloo import spawn_ranks

from animevq.nn.quantizer_config import FSQConfig
from animevq.nn.quantizers import FiniteScalarQuantizer, build_quantizer

LEVELS = (8, 5, 3, 4)  # even and odd levels; K = 480


def reference_digits(z: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Mentzer et al. appendix A.1 in float64, channel by channel: digits in [0, L)."""
    out = torch.empty_like(z, dtype=torch.float64)
    for i, level in enumerate(levels):
        half = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        bounded = torch.tanh(z[:, i].double() + math.atanh(offset / half)) * half - offset
        out[:, i] = torch.round(bounded) + level // 2
    return out


def latents_of(indices: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """(B,h,w) indices → (B,D,h,w) latents whose bounded value rounds to the code's integer v:
    the inverse of the bound at 0.95·v (v itself lies beyond tanh's reach for the outermost
    value of an even level), in float64."""
    digits, rest = [], indices.long()
    for level in levels:
        digits.append(rest % level)
        rest = rest // level
    z = []
    for digit, level in zip(digits, levels):
        half, offset = (level - 1) * (1 - 1e-3) / 2, (0.5 if level % 2 == 0 else 0.0)
        value = 0.95 * (digit.double() - level // 2)
        z.append(torch.atanh((value + offset) / half) - math.atanh(offset / half))
    return torch.stack(z, 1).float()


def test_rounding_matches_the_float64_reference_and_takes_exactly_l_values_per_channel() -> None:
    fsq = FiniteScalarQuantizer(LEVELS)
    z = torch.linspace(-6, 6, 4001).view(1, 1, -1, 1).expand(1, len(LEVELS), -1, 1).contiguous()
    z = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    digits = fsq._digits(z)
    assert torch.equal(digits.double(), reference_digits(z, LEVELS))
    for i, level in enumerate(LEVELS):
        assert sorted(digits[:, i].unique().tolist()) == list(range(level))  # every value, no more
    assert fsq.bound(torch.zeros(1, len(LEVELS), 1, 1)).abs().max() < 1e-6  # centred: 0 stays at 0


def test_indices_are_a_bijection_with_the_codes() -> None:
    fsq = FiniteScalarQuantizer(LEVELS)
    k = fsq.codebook_size
    assert k == 8 * 5 * 3 * 4 and fsq.embedding_dim == 4
    every = torch.arange(k).view(1, 1, k)
    codes = fsq.indices_to_codes(every)  # (1,D,1,K)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.unique(codes[0, :, 0].T, dim=0).shape[0] == k  # K distinct codes
    out = fsq(latents_of(every, LEVELS))
    assert torch.equal(out.indices, every)  # latents of code k get index k
    assert torch.allclose(out.z_q, codes, atol=1e-6)
    assert torch.equal(fsq.encode(latents_of(every, LEVELS)), every)
    assert out.stats.code_usage_rate == 1 and torch.equal(out.stats.counts, torch.ones(k))
    assert torch.isclose(out.stats.perplexity, torch.tensor(float(k)))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 480\)"):
        fsq.indices_to_codes(torch.tensor([[[480]]]))


def test_straight_through_gradient_is_the_bounds_derivative_over_the_half_width() -> None:
    fsq = FiniteScalarQuantizer((8, 5))
    z = torch.randn(3, 2, 2, 2, dtype=torch.float32, requires_grad=True)
    fsq(z).z_q.sum().backward()
    expected = torch.func.vmap(torch.func.grad(lambda v: fsq.bound(v.view(1, 2, 1, 1)).div(
        torch.tensor([4.0, 2.0]).view(1, 2, 1, 1)).sum()))(z.detach().permute(0, 2, 3, 1).reshape(-1, 2))
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 2), expected, atol=1e-6)
    assert (z.grad != 0).all()


def test_no_losses_and_float32_under_bf16_autocast() -> None:
    fsq = FiniteScalarQuantizer(LEVELS)
    z = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z.bfloat16())
    assert out.losses == {} and float(out.loss) == 0.0 and out.z_q.dtype == torch.float32
    assert torch.equal(out.indices, fsq.encode(z.bfloat16()))
    assert list(fsq.state_dict()) == []  # nothing to save: the levels are in the config


def test_built_from_its_config_and_bad_levels_refused() -> None:
    assert build_quantizer(FSQConfig(levels=(8, 8, 8, 5, 5, 5))).codebook_size == 64000
    with pytest.raises(ValueError, match="levels must be a non-empty list of integers >= 2"):
        FSQConfig(levels=(8, 1))
    with pytest.raises(ValueError, match="the product of levels must be at most 16777216"):
        FSQConfig(levels=(1024, 1024, 1024))
    with pytest.raises(ValueError, match=r"expected \(B,4,h,w\) latents"):
        FiniteScalarQuantizer(LEVELS)(torch.zeros(1, 3, 2, 2))


def _ddp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    grad, counts = _fsq_step(_global_batch()[2 * rank : 2 * rank + 2])
    dist.all_reduce(grad)
    dist.all_reduce(counts)
    torch.save((grad / 2, counts), f"{out}/rank{rank}.pt")


def _global_batch() -> torch.Tensor:
    return torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1)) * 2


def _fsq_step(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared linear map into FSQ, a loss on z_q: the map's gradient and the batch's counts."""
    torch.manual_seed(0)
    project = torch.nn.Conv2d(6, 4, 1)
    fsq = FiniteScalarQuantizer(LEVELS).train()
    out = fsq(project(z))
    (out.z_q * torch.linspace(-1, 1, 9).view(1, 1, 3, 3)).mean().backward()
    return project.weight.grad.clone(), out.stats.counts


def test_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path) -> None:
    spawn_ranks(_ddp_worker, str(tmp_path))
    grad, counts = _fsq_step(_global_batch())
    for rank in range(2):
        ddp_grad, ddp_counts = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(ddp_grad, grad, atol=1e-7) and torch.equal(ddp_counts, counts)
