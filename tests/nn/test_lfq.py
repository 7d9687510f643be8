"""LFQ's maths against brute-force references over all 2^D codes, and under gloo DDP."""

from __future__ import annotations

import itertools

import pytest
import torch

from gloo import spawn_ranks

from animevq.nn.quantizer_config import LFQConfig
from animevq.nn.quantizers import LookupFreeQuantizer, build_quantizer
from animevq.nn.quantizers.lfq import bit_groups


def all_codes(bits: int) -> torch.Tensor:
    """(2^D, D) float64 codes in {−1, +1}, row k the code of index k (bit i = channel i)."""
    return torch.tensor([[1.0 if (k >> i) & 1 else -1.0 for i in range(bits)] for k in range(2**bits)],
                        dtype=torch.float64)


def reference_entropy(z: torch.Tensor, tau: float, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGVIT-v2's two entropy terms by brute force in float64: q(c|z) = softmax_c(−‖z − c‖²/τ)
    over every code; the codebook entropy summed over the bit groups' marginals."""
    z = z.double()
    sample = 0.0
    q = torch.softmax(-torch.cdist(z, all_codes(z.shape[1])) ** 2 / tau, dim=1)  # (N, 2^D)
    sample = -(q * q.clamp_min(1e-300).log()).sum(1).mean()
    mean = q.mean(0)  # (2^D,)
    codebook, start = 0.0, 0
    for g in groups:  # marginal of bits [start, start+g): sum the joint over the other bits
        keys = (torch.arange(2 ** z.shape[1]) >> start) & (2**g - 1)
        marginal = torch.zeros(2**g, dtype=torch.float64).index_add_(0, keys, mean)
        codebook = codebook - (marginal * marginal.clamp_min(1e-300).log()).sum()
        start += g
    return sample, codebook


def test_codes_are_the_signs_and_indices_a_bijection() -> None:
    lfq = LookupFreeQuantizer(6)
    assert lfq.codebook_size == 64 and lfq.embedding_dim == 6
    every = torch.arange(64).view(1, 8, 8)
    codes = lfq.indices_to_codes(every)  # (1,6,8,8)
    assert torch.equal(codes.permute(0, 2, 3, 1).reshape(64, 6).double(), all_codes(6))
    z = codes * torch.rand(codes.shape, generator=torch.Generator().manual_seed(0)).add(0.01)  # same signs
    out = lfq(z)
    assert torch.equal(out.indices, every) and torch.equal(lfq.encode(z), every)
    assert torch.equal(out.z_q, codes)  # the value is exactly the code
    assert out.stats.code_usage_rate == 1 and torch.isclose(out.stats.perplexity, torch.tensor(64.0))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        lfq.indices_to_codes(torch.tensor([[[64]]]))
    with pytest.raises(ValueError, match=r"expected \(B,6,h,w\) latents"):
        lfq(torch.zeros(1, 5, 2, 2))


@pytest.mark.parametrize(("bits", "group_bits"), [(6, 10), (7, 3)])
def test_entropy_terms_match_the_brute_force_softmax(bits: int, group_bits: int) -> None:
    tau = 0.5  # soft enough that both terms are far from their limits
    lfq = LookupFreeQuantizer(bits, entropy_temperature=tau, entropy_group_bits=group_bits,
                              sample_entropy_weight=1.0, codebook_entropy_weight=0.0)
    z = torch.randn(40, bits, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
    groups = bit_groups(bits, group_bits)
    sample, codebook = reference_entropy(z, tau, groups)
    assert torch.allclose(lfq.entropy_loss(z).double(), sample, atol=1e-5)
    lfq = LookupFreeQuantizer(bits, entropy_temperature=tau, entropy_group_bits=group_bits,
                              sample_entropy_weight=0.0, codebook_entropy_weight=1.0)
    assert torch.allclose(-lfq.entropy_loss(z).double(), codebook, atol=1e-5)
    if len(groups) == 1:  # one group: the exact joint entropy, which is at most D·log 2
        assert codebook <= bits * torch.log(torch.tensor(2.0)) + 1e-9


def test_bit_groups_are_even_and_cover_every_bit() -> None:
    assert bit_groups(10, 10) == [10] and bit_groups(14, 10) == [7, 7] and bit_groups(18, 10) == [9, 9]
    assert bit_groups(7, 3) == [3, 2, 2]
    for bits, most in itertools.product(range(1, 25), range(1, 17)):
        groups = bit_groups(bits, most)
        assert sum(groups) == bits and max(groups) <= most and max(groups) - min(groups) <= 1


def test_losses_gradients_and_float32_under_bf16_autocast() -> None:
    lfq = LookupFreeQuantizer(5, entropy_weight=0.3, commitment_cost=0.5)
    assert lfq.loss_weights == {"entropy_loss": 0.3}
    z = torch.randn(2, 5, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lfq(z.bfloat16())
    assert out.z_q.dtype == torch.float32 and set(out.losses) == {"commitment_loss", "entropy_loss"}
    assert torch.isclose(out.losses["commitment_loss"], ((z.bfloat16().float() - z.sign()) ** 2).mean())
    assert torch.isclose(out.loss, 0.5 * out.losses["commitment_loss"] + 0.3 * out.losses["entropy_loss"])
    (out.z_q.sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad != 0).all()
    assert list(lfq.state_dict()) == []  # nothing to save: the bits are in the config


def test_the_entropy_loss_spreads_collapsed_codes() -> None:
    """Latents all of one sign use one code; a few steps on the entropy loss alone use many."""
    torch.manual_seed(0)
    lfq = LookupFreeQuantizer(4, entropy_temperature=0.5)
    z = (torch.rand(64, 4, 1, 1) * 0.1 + 0.05).requires_grad_()
    assert int(lfq(z).stats.counts.gt(0).sum()) == 1
    opt = torch.optim.SGD([z], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        lfq(z).losses["entropy_loss"].backward()
        opt.step()
    assert int(lfq(z).stats.counts.gt(0).sum()) >= 12


def test_built_from_its_config_and_bad_settings_refused() -> None:
    q = build_quantizer(LFQConfig(embedding_dim=14, entropy_group_bits=7))
    assert isinstance(q, LookupFreeQuantizer) and q.codebook_size == 16384 and q.groups == [7, 7]
    with pytest.raises(ValueError, match=r"embedding_dim \(bits\) must lie in \[1, 24\]"):
        LFQConfig(embedding_dim=25)
    with pytest.raises(ValueError, match="entropy_temperature > 0"):
        LFQConfig(entropy_temperature=0.0)


def _step(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared linear map into LFQ and its codebook entropy (the term that spans the ranks; the
    per-sample term is a plain mean, which DDP's averaging already makes global): the map's
    gradient and the loss."""
    torch.manual_seed(0)
    project = torch.nn.Conv2d(6, 5, 1)
    lfq = LookupFreeQuantizer(5, entropy_temperature=0.5, entropy_group_bits=3, sample_entropy_weight=0.0).train()
    loss = lfq(project(z)).losses["entropy_loss"]
    loss.backward()
    return project.weight.grad.clone(), loss.detach()


def _global_batch() -> torch.Tensor:
    return torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1))


def _ddp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    grad, loss = _step(_global_batch()[2 * rank : 2 * rank + 2])
    dist.all_reduce(grad)  # what DDP does, then divides by the world size
    torch.save((grad / 2, loss), f"{out}/rank{rank}.pt")


def test_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path) -> None:
    """The codebook entropy is of the global batch's mean: under DDP, the loss on every rank and
    the averaged gradient equal those of one process that sees every rank's images."""
    spawn_ranks(_ddp_worker, str(tmp_path))
    grad, loss = _step(_global_batch())
    for rank in range(2):
        ddp_grad, ddp_loss = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(ddp_loss, loss, atol=1e-6) and torch.allclose(ddp_grad, grad, atol=1e-6)
