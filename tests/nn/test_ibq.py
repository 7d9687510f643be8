"""IBQ: argmax of inner products, a straight-through one-hot that trains every code, the
double quantisation loss against float64 references, DDP parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo import spawn_ranks

from animevq.nn.quantizer_config import IBQConfig
from animevq.nn.quantizers import IndexBackpropagationQuantizer, build_quantizer
from animevq.nn.quantizers.ibq import best_code

K, D = 64, 4  # more codes than the 30 vectors of a batch: some codes are never chosen
BETA = 0.25
WORLD = 2


def make(entropy_weight: float = 0.0, temperature: float = 1.0) -> IndexBackpropagationQuantizer:
    """The family without its entropy loss unless asked (the reference's quantizer default)."""
    torch.manual_seed(5)
    return IndexBackpropagationQuantizer(K, D, BETA, entropy_weight=entropy_weight, entropy_temperature=temperature)


def latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, D, 3, 5, generator=torch.Generator().manual_seed(seed))  # (B,D,h,w)


def reference64(codebook: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's IndexPropagationQuantize in float64 (one-hots materialised): z_q, the
    hard z_q and the three loss terms. ``codebook`` (K,D) and ``z`` (B,D,h,w) as given."""
    logits = torch.einsum("bdhw,nd->bnhw", z, codebook)  # (B,K,h,w)
    soft = logits.softmax(dim=1)
    hard = F.one_hot(logits.argmax(dim=1), K).permute(0, 3, 1, 2).to(soft)  # (B,K,h,w)
    one_hot = hard - soft.detach() + soft
    z_q = torch.einsum("bnhw,nd->bdhw", one_hot, codebook)
    z_q_hard = torch.einsum("bnhw,nd->bdhw", hard, codebook)
    return {
        "z_q": z_q, "indices": logits.argmax(dim=1),
        "double_quant_loss": ((z_q - z) ** 2).mean(),
        "commitment_loss": ((z_q_hard.detach() - z) ** 2).mean(),
        "vq_loss": ((z_q_hard - z.detach()) ** 2).mean(),
    }


def leaves64(q: IndexBackpropagationQuantizer, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q.embedding.detach().double().requires_grad_(), z.detach().double().requires_grad_()


def test_built_from_its_config() -> None:
    q = build_quantizer(IBQConfig(num_embeddings=K, embedding_dim=D, commitment_cost=0.5))
    assert isinstance(q, IndexBackpropagationQuantizer) and (q.codebook_size, q.embedding_dim) == (K, D)
    assert q.loss_weights == {"double_quant_loss": 1.0, "entropy_loss": 0.05}  # the reference recipe's weight
    assert IndexBackpropagationQuantizer(K, D).config.entropy_weight == 0.05
    with pytest.raises(ValueError, match="ibq needs entropy_temperature > 0"):
        IBQConfig(entropy_temperature=0.0)
    assert [name for name, _ in q.named_parameters()] == ["embedding"] and q.codebook.shape == (K, D)


def test_value_is_the_hard_code_of_largest_inner_product() -> None:
    q = make()
    z = latents()
    out = q(z)
    ref = reference64(*leaves64(q, z))
    assert torch.equal(out.indices, ref["indices"]) and torch.equal(q.encode(z), ref["indices"])
    hard = q.embedding.detach()[out.indices].permute(0, 3, 1, 2)  # (B,h,w,D) → (B,D,h,w)
    assert torch.equal(out.z_q, hard)  # the straight-through part is exactly zero in value
    assert torch.allclose(out.z_q.double(), ref["z_q"], atol=1e-6)
    # By inner product, not distance: the nearest codes differ here.
    flat = z.permute(0, 2, 3, 1).reshape(-1, D).double()
    nearest = torch.cdist(flat, q.embedding.detach().double()).argmin(1).view(2, 3, 5)
    assert not torch.equal(nearest, out.indices)


def test_gradient_reaches_every_code_as_the_float64_reference() -> None:
    q = make()
    z = latents().requires_grad_()
    r = torch.randn(2, D, 3, 5, generator=torch.Generator().manual_seed(1))  # a decoder-like readout
    out = q(z)
    (out.z_q * r).sum().backward()
    assert (q.embedding.grad.abs().sum(1) > 0).all()  # every row, chosen or not
    c64, z64 = leaves64(q, z)
    (reference64(c64, z64)["z_q"] * r.double()).sum().backward()
    assert torch.allclose(q.embedding.grad.double(), c64.grad, atol=1e-6)
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-6)
    # Contrast: a plain hard lookup trains the chosen rows only.
    c = q.embedding.detach().clone().requires_grad_()
    (F.embedding(out.indices, c).permute(0, 3, 1, 2) * r).sum().backward()
    unused = torch.ones(K, dtype=torch.bool).index_fill_(0, out.indices.flatten(), False)
    assert unused.sum() >= K - 30 and (c.grad[unused] == 0).all() and (q.embedding.grad[unused] != 0).any(1).all()


def test_family_loss_weighs_beta_on_the_commitment_term() -> None:
    q = make()
    z = latents().requires_grad_()
    q(z).loss.backward()
    c64, z64 = leaves64(q, z)
    ref = reference64(c64, z64)
    (ref["vq_loss"] + BETA * ref["commitment_loss"] + ref["double_quant_loss"]).backward()
    assert torch.allclose(q.embedding.grad.double(), c64.grad, atol=1e-7)
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-7)


@pytest.mark.parametrize("name", ["vq_loss", "commitment_loss", "double_quant_loss"])
def test_double_quantisation_loss_terms_equal_float64_hand_computed(name: str) -> None:
    q = make()
    z = latents().requires_grad_()
    out = q(z)
    c64, z64 = leaves64(q, z)
    ref = reference64(c64, z64)
    # Every term's value is the mean squared distance of z to its hard code ...
    mse = ((c64.detach()[ref["indices"]].permute(0, 3, 1, 2) - z64.detach()) ** 2).mean()
    assert out.losses[name].dtype == torch.float32 and torch.allclose(out.losses[name].double(), mse)
    assert torch.allclose(out.loss.double(), (1 + BETA + 1) * mse)
    # ... and its gradients are the reference term's.
    out.losses[name].backward()
    ref[name].backward()
    for got, want in ((q.embedding.grad, c64.grad), (z.grad, z64.grad)):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.allclose(got.double(), want, atol=1e-7)
    trained = {"vq_loss": "codebook", "commitment_loss": "encoder", "double_quant_loss": "both"}[name]
    assert (q.embedding.grad is not None) == (trained in ("codebook", "both"))
    assert (z.grad is not None) == (trained in ("encoder", "both"))


def test_round_trip_eval_mode_and_index_checks() -> None:
    q = make()
    z = latents()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    train_out = q.train()(z)
    out = q.eval()(z)
    assert torch.equal(train_out.z_q, out.z_q) and torch.equal(train_out.indices, out.indices)
    assert torch.equal(q.indices_to_codes(q.encode(z)), out.z_q)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())  # nothing changed
    assert int(out.stats.restarted) == 0 and out.stats.restarted.dtype == torch.long
    assert torch.equal(out.stats.counts, torch.bincount(out.indices.flatten(), minlength=K).float())
    for bad in (K, -1):
        with pytest.raises(ValueError, match=rf"\[0, {K}\)"):
            q.indices_to_codes(torch.full((1, 2, 2), bad))
    with pytest.raises(TypeError):
        q.indices_to_codes(torch.zeros(1, 2, 2))
    flat = torch.randn(50, D)
    assert torch.equal(best_code(flat, q.embedding, chunk_elements=1), best_code(flat, q.embedding))
    assert torch.equal(best_code(flat, q.embedding, chunk_elements=7 * K), (flat @ q.embedding.t()).argmax(1))


def test_bf16_autocast_computes_in_float32() -> None:
    q = make()
    z = latents()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        indices = q.encode(z.bfloat16())
    assert out.z_q.dtype == out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    assert torch.equal(indices, out.indices) and torch.equal(out.indices, q(z.bfloat16().float()).indices)


def test_entropy_loss_is_magvit2s_over_the_softmax_of_the_logits() -> None:
    tau = 0.7
    q = make(entropy_weight=0.2, temperature=tau)
    z = latents().requires_grad_()
    out = q(z)
    c64, z64 = leaves64(q, z)
    logits = torch.einsum("bdhw,nd->bhwn", z64, c64).reshape(-1, K) / tau
    p = logits.softmax(1)
    sample = -(p * p.log()).sum(1).mean()
    mean = p.mean(0)
    ref = sample + (mean * mean.log()).sum()  # E[H(q)] − H(E[q]), both weights 1
    assert torch.allclose(out.losses["entropy_loss"].double(), ref, atol=1e-6)
    ref_total = reference64(c64, z64)
    quant = ref_total["vq_loss"] + BETA * ref_total["commitment_loss"] + ref_total["double_quant_loss"]
    assert torch.allclose(out.loss.double(), quant + 0.2 * ref, atol=1e-6)
    out.losses["entropy_loss"].backward()
    ref.backward()
    assert torch.allclose(q.embedding.grad.double(), c64.grad, atol=1e-6)
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-6)
    assert "entropy_loss" not in make()(latents()).losses  # weight 0: not computed


def test_the_entropy_loss_keeps_a_collapsing_codebook_in_use() -> None:
    """One code of large norm wins every inner product; training on the family's loss alone,
    the entropy loss spreads the choices over many codes, and without it they stay on one."""
    z = latents(8, seed=3)

    def codes_in_use(entropy_weight: float) -> int:
        q = make(entropy_weight=entropy_weight, temperature=1.0)
        with torch.no_grad():
            q.embedding[0] = 2.0  # a code of large norm along (1,1,1,1)
        encoder = torch.nn.Conv2d(D, D, 1)
        with torch.no_grad():
            encoder.weight.copy_(torch.eye(D).view(D, D, 1, 1))
            encoder.bias.fill_(2.0)  # every latent points along that code
        opt = torch.optim.Adam([*encoder.parameters(), q.embedding], lr=0.05)
        assert int(q(encoder(z)).stats.counts.gt(0).sum()) == 1
        for _ in range(60):
            opt.zero_grad()
            q(encoder(z)).loss.backward()
            opt.step()
        return int(q(encoder(z)).stats.counts.gt(0).sum())

    assert codes_in_use(1.0) >= 24 and codes_in_use(0.0) <= 8  # measured: 33 and 4 of the 64


# DDP: each rank takes half of one global batch; averaged gradients equal one process's.


def objective(q: IndexBackpropagationQuantizer, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the family's loss plus a decoder-like mean of z_q (a per-vector average,
    as a reconstruction loss is, so DDP's gradient average matches the global batch)."""
    q.zero_grad(set_to_none=True)
    out = q(z)
    r = torch.linspace(-1.0, 1.0, D).view(1, D, 1, 1)
    (out.loss + (out.z_q * r).mean()).backward()
    return q.embedding.grad.flatten(), out.stats.counts


def worker(rank: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    z = latents(2 * WORLD)[2 * rank : 2 * rank + 2]
    grads, counts = objective(make(entropy_weight=0.05), z)
    dist.all_reduce(grads)
    torch.save({"grads": grads / WORLD, "counts": counts}, Path(result_dir) / f"rank{rank}.pt")


@pytest.mark.timeout(120)
def test_ddp_halves_average_to_the_global_batch(tmp_path: Path) -> None:
    spawn_ranks(worker, str(tmp_path), world=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    grads, counts = objective(make(entropy_weight=0.05), latents(2 * WORLD))  # the entropy is of the global batch
    assert (grads.view(K, D).abs().sum(1) > 0).all()
    for result in ranks:
        assert torch.allclose(result["grads"], grads, atol=1e-6)
    assert torch.equal(ranks[0]["counts"] + ranks[1]["counts"], counts)
    assert not torch.equal(ranks[0]["counts"], ranks[1]["counts"])  # the ranks did see different halves
