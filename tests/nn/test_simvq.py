"""SimVQ: nearest codes of C·Wᵀ + b, a frozen seeded C, gradients to W only, DDP parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gloo import spawn_ranks

from animevq.nn.quantizer_config import SimVQConfig
from animevq.nn.quantizers import SimVQ, build_quantizer

K, D = 16, 4
BETA = 0.25
WORLD = 2


def make(seed: int = 1) -> SimVQ:
    torch.manual_seed(11)  # W and b: nn.Linear's init from the global generator
    return SimVQ(K, D, BETA, seed=seed)


def latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, D, 3, 5, generator=torch.Generator().manual_seed(seed))  # (B,D,h,w)


def codes64(q: SimVQ) -> torch.Tensor:
    """C·Wᵀ + b in float64: (K,D)."""
    w, b = q.projection.weight.detach().double(), q.projection.bias.detach().double()
    return q.base_codebook.double() @ w.t() + b


def test_built_from_its_config() -> None:
    q = build_quantizer(SimVQConfig(num_embeddings=K, embedding_dim=D, commitment_cost=0.5, seed=3))
    assert isinstance(q, SimVQ) and (q.codebook_size, q.embedding_dim, q.commitment_cost, q.seed) == (K, D, 0.5, 3)
    assert sum(p.numel() for p in q.parameters()) == D * (D + 1)  # W and b; C is no parameter


def test_indices_equal_float64_brute_force_against_projected_codes() -> None:
    q = make()
    z = latents()
    e64 = codes64(q)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D).double()  # (N,D)
    expected = ((flat[:, None, :] - e64[None]) ** 2).sum(-1).argmin(1).view(2, 3, 5)
    out = q(z)
    assert torch.equal(out.indices, expected) and torch.equal(q.encode(z), expected)
    assert torch.allclose(q.codebook.double(), e64, atol=1e-6)
    # Wᵀ, not W: with a non-symmetric W the other product picks other codes.
    w = q.projection.weight.detach().double()
    wrong = q.base_codebook.double() @ w + q.projection.bias.detach().double()
    assert not torch.equal(((flat[:, None, :] - wrong[None]) ** 2).sum(-1).argmin(1).view(2, 3, 5), expected)
    assert torch.allclose(out.z_q.double(), e64[expected].permute(0, 3, 1, 2), atol=1e-6)


def test_losses_and_gradients_reach_w_and_never_c() -> None:
    q = make()
    z = latents().requires_grad_()
    out = q(z)
    mse = ((out.z_q.detach().double() - z.detach().double()) ** 2).mean()
    for name in ("vq_loss", "commitment_loss"):
        assert out.losses[name].dtype == torch.float32 and torch.allclose(out.losses[name].double(), mse)
    assert torch.allclose(out.loss, out.losses["vq_loss"] + BETA * out.losses["commitment_loss"])

    out.losses["vq_loss"].backward(retain_graph=True)  # the codebook term trains W and b only
    assert z.grad is None and q.projection.weight.grad.abs().sum() > 0 and q.projection.bias.grad.abs().sum() > 0
    q.zero_grad(set_to_none=True)
    out.losses["commitment_loss"].backward(retain_graph=True)  # the commitment term the encoder only
    assert q.projection.weight.grad is None and z.grad.abs().sum() > 0
    z.grad = None

    r = torch.randn(1, D, 1, 1)  # a decoder-like readout of z_q
    (out.loss + (out.z_q * r).sum()).backward()
    # Straight-through: dL/dz = r + β·2(z − z_q)/numel.
    expected = r + BETA * 2 * (z.detach() - out.z_q.detach()) / z.numel()
    assert torch.allclose(z.grad, expected.expand_as(z), atol=1e-7)
    assert q.projection.weight.grad.abs().sum() > 0
    assert dict(q.named_buffers())["base_codebook"].grad is None
    assert "base_codebook" not in dict(q.named_parameters())

    c, w = q.base_codebook.clone(), q.projection.weight.detach().clone()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert torch.equal(q.base_codebook, c) and not torch.equal(q.projection.weight, w)


def test_frozen_codebook_is_seeded_and_saved_with_the_weights() -> None:
    torch.manual_seed(0)
    a = SimVQ(256, 16, seed=5)
    torch.manual_seed(1)  # the global generator plays no part in C
    b = SimVQ(256, 16, seed=5)
    assert torch.equal(a.base_codebook, b.base_codebook)
    assert not torch.equal(a.base_codebook, SimVQ(256, 16, seed=6).base_codebook)
    assert abs(float(a.base_codebook.std()) - 16**-0.5) < 0.1 * 16**-0.5  # N(0, 1/D), the reference's init
    assert abs(float(a.base_codebook.mean())) < 0.05
    state = a.state_dict()
    assert set(state) == {"base_codebook", "projection.weight", "projection.bias"}
    other = SimVQ(256, 16, seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.base_codebook, a.base_codebook) and torch.equal(other.codebook, a.codebook)


def test_decode_of_encode_equals_forward_and_indices_are_checked() -> None:
    q = make()
    z = latents()
    out = q.eval()(z)
    assert torch.equal(q.indices_to_codes(q.encode(z)), out.z_q)
    assert torch.equal(q.train()(z).z_q, out.z_q)  # no state: both modes alike
    assert out.stats.restarted.dtype == torch.long and out.stats.restarted.dim() == 0 and int(out.stats.restarted) == 0
    counts = torch.bincount(out.indices.flatten(), minlength=K).float()
    assert torch.equal(out.stats.counts, counts)
    assert torch.isclose(out.stats.code_usage_rate, (counts > 0).float().mean())
    for bad in (K, -1):
        with pytest.raises(ValueError, match=rf"\[0, {K}\)"):
            q.indices_to_codes(torch.full((1, 2, 2), bad))
    with pytest.raises(TypeError):
        q.indices_to_codes(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        q(torch.randn(2, D + 1, 3, 3))


def test_bf16_autocast_computes_in_float32() -> None:
    q = make()
    z = latents()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        indices = q.encode(z.bfloat16())
    assert out.z_q.dtype == out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    assert torch.equal(indices, out.indices)
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)


# DDP: each rank takes half of one global batch; averaged gradients equal one process's.


def objective(q: SimVQ, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the family's loss plus a decoder-like mean of z_q (a per-vector average,
    as a reconstruction loss is, so DDP's gradient average matches the global batch)."""
    q.zero_grad(set_to_none=True)
    out = q(z)
    r = torch.linspace(-1.0, 1.0, D).view(1, D, 1, 1)
    (out.loss + (out.z_q * r).mean()).backward()
    return torch.cat([p.grad.flatten() for p in q.parameters()]), out.stats.counts


def worker(rank: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    z = latents(2 * WORLD)[2 * rank : 2 * rank + 2]
    grads, counts = objective(make(), z)
    dist.all_reduce(grads)
    torch.save({"grads": grads / WORLD, "counts": counts}, Path(result_dir) / f"rank{rank}.pt")


@pytest.mark.timeout(120)
def test_ddp_halves_average_to_the_global_batch(tmp_path: Path) -> None:
    spawn_ranks(worker, str(tmp_path), world=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    grads, counts = objective(make(), latents(2 * WORLD))
    assert grads.abs().sum() > 0
    for result in ranks:
        assert torch.allclose(result["grads"], grads, atol=1e-6)
    assert torch.equal(ranks[0]["counts"] + ranks[1]["counts"], counts)
    assert not torch.equal(ranks[0]["counts"], ranks[1]["counts"])  # the ranks did see different halves
