from __future__ import annotations

import pytest
import torch

from animevq.nn.quantizers import VectorQuantizerEMA, code_counts, code_stats, lloyd, nearest_code


def brute_force_argmin(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    d = ((z.double()[:, None, :] - e.double()[None, :, :]) ** 2).sum(-1)
    return d.argmin(1)


def test_indices_equal_float64_brute_force_even_in_chunks() -> None:
    z, e = torch.randn(300, 8), torch.randn(37, 8)
    expected = brute_force_argmin(z, e)
    assert torch.equal(nearest_code(z, e), expected)
    assert torch.equal(nearest_code(z, e, chunk_elements=37 * 7), expected)  # 7 rows per chunk
    assert torch.equal(nearest_code(z, e, chunk_elements=1), expected)  # one row per chunk


def test_distances_in_float32_under_autocast() -> None:
    z, e = torch.randn(64, 16), torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(z.bfloat16(), e)
    assert torch.equal(got, brute_force_argmin(z.bfloat16().float(), e))


def test_large_codebook_chunk_bound() -> None:
    """K = 65,536 with 8,192 vectors: chunks keep distances within the bound."""
    from animevq.nn.quantizers import kmeans as quantizer

    k, n = 65_536, 8_192
    rows = max(1, quantizer.DISTANCE_CHUNK_ELEMENTS // k)
    assert rows * k * 4 <= 128 * 2**20 < n * k * 4  # 128 MiB chunk vs 2 GiB full matrix
    z, e = torch.randn(n, 4), torch.randn(k, 4)
    got = nearest_code(z[:64], e)
    assert torch.equal(got, brute_force_argmin(z[:64], e))


def test_output_shapes_and_straight_through_gradient() -> None:
    vq = VectorQuantizerEMA(16, 4, restart_dead_codes=False)
    z_e = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = vq(z_e)
    assert out.z_q.shape == z_e.shape and out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.long
    (out.z_q * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
    # Straight-through: dL/dz_e equals dL/dz_q.
    assert torch.equal(z_e.grad, torch.arange(4.0).view(1, 4, 1, 1).expand_as(z_e))


def test_losses_have_beta_on_the_commitment_term_only() -> None:
    vq = VectorQuantizerEMA(8, 3, commitment_cost=0.25, restart_dead_codes=False).eval()
    z_e = torch.randn(2, 3, 2, 2)
    out = vq(z_e)
    z_q = vq.indices_to_codes(out.indices)
    mse = ((z_q - z_e) ** 2).mean()
    assert torch.allclose(out.losses["vq_loss"], mse) and torch.allclose(out.losses["commitment_loss"], mse)
    assert torch.allclose(out.loss, mse * 1.25)
    # vq_loss reaches only the codebook, commitment only the encoder.
    vq_grad = VectorQuantizerEMA(8, 3, decay=0.0).eval()
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    o = vq_grad(z)
    o.losses["vq_loss"].backward()
    assert z.grad is None or torch.all(z.grad == 0)
    assert vq_grad.embedding.grad is not None and vq_grad.embedding.grad.abs().sum() > 0


def test_ema_update_matches_spec_formula() -> None:
    k, d, gamma, eps = 6, 3, 0.9, 1e-5
    vq = VectorQuantizerEMA(k, d, decay=gamma, eps=eps, restart_dead_codes=False)
    e0 = vq.codebook.clone()
    target = 2  # put every vector nearest to code 2
    z = e0[target] + 0.01 * torch.randn(10, d)
    vq(z.view(10, d, 1, 1).permute(1, 0, 2, 3).reshape(1, d, 10, 1).contiguous())
    n = torch.zeros(k)
    n[target] = 10
    s = torch.zeros(k, d)
    s[target] = z.sum(0)
    N = gamma * torch.ones(k) + (1 - gamma) * n
    m = gamma * e0 + (1 - gamma) * s
    smoothed = (N + eps) / (N.sum() + k * eps) * N.sum()
    expected = m / smoothed[:, None]
    assert torch.allclose(vq.codebook, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(vq.cluster_size, N) and torch.allclose(vq.embed_sum, m)
    # The code moved toward the batch mean.
    assert (vq.codebook[target] - z.mean(0)).norm() < (e0[target] - z.mean(0)).norm()


def test_unused_codes_stay_put_and_finite() -> None:
    vq = VectorQuantizerEMA(8, 4, restart_dead_codes=False)
    e0 = vq.codebook.clone()
    z = e0[0].view(1, 4, 1, 1).expand(4, 4, 2, 2).contiguous()  # always code 0
    for _ in range(100):
        vq(z)
    assert torch.allclose(vq.codebook[1:], e0[1:], rtol=1e-3, atol=1e-7)
    for _ in range(9_900):
        vq(z)
    assert torch.isfinite(vq.codebook).all() and torch.isfinite(vq.cluster_size).all()


def test_eval_mode_changes_nothing() -> None:
    vq = VectorQuantizerEMA(8, 4).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 4, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_perplexity_and_usage_on_hand_made_assignment() -> None:
    counts = torch.tensor([2.0, 2.0, 0.0, 0.0])
    perplexity, usage = code_stats(counts)
    assert torch.isclose(perplexity, torch.tensor(2.0)) and usage == 0.5
    counts = torch.tensor([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0])
    assert torch.isclose(code_stats(counts)[0], torch.tensor(4.0)) and code_stats(counts)[1] == 0.5
    vq = VectorQuantizerEMA(4, 2, restart_dead_codes=False).eval()
    codes = vq.codebook
    z = torch.stack([codes[0], codes[0], codes[3], codes[3]]).T.reshape(1, 2, 2, 2)
    out = vq(z)
    assert torch.isclose(out.stats.perplexity, torch.tensor(2.0)) and out.stats.code_usage_rate == 0.5


def test_code_counts_match_bincount_including_unused_last_codes() -> None:
    indices = torch.tensor([[0, 3, 3], [5, 0, 3]])
    counts = code_counts(indices, 9)  # codes 6..8 never chosen: still counted as zeros
    assert counts.dtype == torch.float32 and counts.shape == (9,)
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=9).float())
    big = torch.randint(0, 1024, (4096,))
    assert torch.equal(code_counts(big, 1024), torch.bincount(big, minlength=1024).float())


def test_dead_codes_restart_from_batch_vectors() -> None:
    vq = VectorQuantizerEMA(8, 2, decay=0.5, dead_code_threshold=0.125)
    z = torch.randn(1, 2, 4, 8)  # 32 vectors
    e0 = vq.codebook.clone()
    collapsed = e0[0].view(1, 2, 1, 1).expand(1, 2, 4, 8).contiguous()
    restarted = 0
    for _ in range(5):
        restarted += int(vq(collapsed).stats.restarted)
    assert restarted > 0
    # Every restarted code is the collapse point, the only vector in those batches.
    moved = ~torch.isclose(vq.codebook, e0).all(1)
    assert moved.any()
    assert torch.allclose(vq.codebook[moved], e0[0].expand(int(moved.sum()), 2), atol=1e-6)
    out = vq(z)
    assert torch.isfinite(out.z_q).all()


def outliers_batch() -> torch.Tensor:
    """(1,2,1010,1): 1,000 vectors at the origin, which code 0 fits, and 10 far outliers."""
    z = torch.zeros(1010, 2)
    z[1000:] = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) + 20.0
    return z.T.reshape(1, 2, 1010, 1).contiguous()


@pytest.mark.parametrize("sampling", ["error", "uniform"])
def test_restarts_go_where_the_codebook_fits_worst_only_with_error_sampling(sampling: str) -> None:
    vq = VectorQuantizerEMA(16, 2, decay=0.5, dead_code_threshold=0.9, restart_sampling=sampling)
    vq.embedding.zero_()
    vq.embed_sum.zero_()
    restarted = int(vq(outliers_batch()).stats.restarted)
    on_outliers = int((vq.codebook.norm(dim=1) > 10).sum())
    assert restarted == 15  # every code but the one the batch used
    if sampling == "error":
        assert on_outliers >= restarted  # all of them; code 0's mean may move out too
    else:
        assert on_outliers <= 3  # 1 % of the vectors: uniform draws rarely land there


def test_error_sampling_draws_by_squared_distance_and_falls_back_to_uniform() -> None:
    vq = VectorQuantizerEMA(2000, 2, restart_sampling="error")
    error = torch.zeros(6)  # squared distance of each of 6 vectors to its code
    owner, row = vq._draw_rows(6, error, error.sum().view(1))  # all on their codes: uniform rows
    assert (owner == 0).all() and row.min() >= 0 and row.max() < 6 and torch.unique(row).numel() == 6
    error[4] = 1.0  # one vector off its code carries all the weight
    assert (vq._draw_rows(6, error, error.sum().view(1))[1] == 4).all()
    error[1] = 9.0  # 9 : 1 weights
    share = (vq._draw_rows(6, error, error.sum().view(1))[1] == 1).float().mean()
    assert 0.85 < share < 0.95


def test_error_sampling_picks_the_rank_by_its_total_then_the_row_within_it() -> None:
    vq = VectorQuantizerEMA(2000, 2, restart_sampling="error")
    mine = torch.tensor([0.0, 0.0, 1.0, 0.0])  # as rank 1 of 2 sees it: only row 2 is off its code
    owner, row = vq._draw_rows(4, mine, torch.tensor([3.0, 1.0]))  # rank 0 holds 3/4 of the error
    assert 0.2 < (owner == 1).float().mean() < 0.3
    assert (row[owner == 1] == 2).all()  # rank 1 resolves its own draws; rank 0 fills the rest


def test_unknown_restart_sampling_is_rejected() -> None:
    with pytest.raises(ValueError, match="restart_sampling must be one of"):
        VectorQuantizerEMA(8, 2, restart_sampling="random")


def test_bad_shapes_and_indices_are_rejected() -> None:
    vq = VectorQuantizerEMA(8, 4)
    with pytest.raises(ValueError, match=r"\(B,4,h,w\)"):
        vq(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.indices_to_codes(torch.tensor([[[8]]]))


def test_kmeans_init_places_codes_on_the_data_clusters() -> None:
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = (centres.repeat_interleave(16, 0) + 0.01 * torch.randn(64, 2)).T.reshape(1, 2, 8, 8)
    vq = VectorQuantizerEMA(4, 2, kmeans_init=True, restart_dead_codes=False)
    assert not bool(vq.initialized)
    out = vq(z)
    assert bool(vq.initialized) and out.stats.code_usage_rate == 1.0  # every cluster got its own code
    distance = torch.cdist(vq.codebook, centres).min(1).values
    assert (distance < 0.1).all()
    before = vq.codebook.clone()
    vq.eval()(z)
    assert torch.equal(before, vq.codebook)  # initialised once, never again


def test_lloyd_moves_codes_to_their_cluster_means_and_leaves_unpicked_codes() -> None:
    vectors = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    codes = torch.tensor([[1.0, 1.0], [9.0, 9.0], [-50.0, 0.0]])  # the third is nearest to nothing
    out = lloyd(vectors, codes, iters=3)
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [10.0, 11.0], [-50.0, 0.0]]))
    assert torch.equal(codes[0], torch.tensor([1.0, 1.0]))  # the input is not modified
    # One step moves a code to its cluster's mean, which can change the next assignment.
    chain = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
    assert torch.equal(lloyd(chain, torch.tensor([[0.0], [1.0]]), iters=1), torch.tensor([[0.0], [10.0 / 3]]))
    assert torch.equal(lloyd(chain, torch.tensor([[0.0], [1.0]]), iters=3), torch.tensor([[0.5], [4.5]]))
    unit = lloyd(torch.randn(50, 3) * 4, torch.randn(5, 3), iters=2, l2_normalize=True)
    assert torch.allclose(unit.norm(dim=1), torch.ones(5), atol=1e-6)


def test_l2_normalized_codes_stay_unit_length() -> None:
    vq = VectorQuantizerEMA(8, 4, l2_normalize=True)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(8), atol=1e-6)
    for _ in range(5):
        out = vq(torch.randn(2, 4, 3, 3) * 7)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)  # compared as unit vectors
