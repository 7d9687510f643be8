"""GPU tests (``python -m pytest -m gpu tests/gpu``); CI has no GPU and deselects them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import merged

from animevq.nn.quantizers import VectorQuantizerEMA, nearest_code
from animevq.train.module import VQVAEModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = dict(latent_channels=32, encoder_channels=(16, 32, 32, 32), decoder_channels=(32, 32, 32, 16),
             num_res_blocks=1, num_embeddings=64, embedding_dim=32, optimization={"warmup_steps": 0},
             log_every_n_steps=1, log_images_every_n_steps=10**6, losses={"lpips_random_init": True})


def batches(n: int = 4, size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader([torch.rand(4, 3, size, size, generator=g) * 2 - 1 for _ in range(n)], batch_size=None)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32"])
@pytest.mark.parametrize("gan", [False, True])
def test_training_is_finite_in_every_precision(tmp_path, precision: str, gan: bool) -> None:
    kwargs = merged(SMALL, dict(lambda_gan=0.5 if gan else 0.0, adversarial={"disc_start": 1, "disc_norm": "group"}))
    model = VQVAEModel(**kwargs)
    before = model.tokenizer.encoder.stem.weight.detach().clone()
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, batches())
    assert model.batches_seen == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.tokenizer.encoder.stem.weight.detach().cpu())


def test_nearest_code_on_gpu_matches_float64_reference() -> None:
    z, e = torch.randn(4096, 64, device="cuda"), torch.randn(1024, 64, device="cuda")
    ref = ((z.double()[:, None] - e.double()[None]) ** 2).sum(-1).argmin(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = nearest_code(z, e)
    assert (got == ref).float().mean() > 0.999  # float32 ties aside


def test_encode_decode_on_gpu_matches_cpu() -> None:
    model = VQVAEModel(**dict(SMALL, use_lpips=False)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cpu = model.encode(x)
    gpu = model.cuda().encode(x.cuda()).cpu()
    assert (cpu == gpu).float().mean() > 0.95
    assert torch.allclose(model.decode(gpu.cuda()).cpu(), model.cpu().decode(gpu), atol=1e-3)


def test_compiled_group_norm_keeps_channels_last_both_ways() -> None:
    """Traced, ATen's CUDA group_norm fixes NCHW strides on its output; ours must keep
    channels_last forward and backward, or Inductor and cuDNN add copies every step."""
    from animevq.nn.blocks import group_norm

    norm = group_norm(64).cuda()
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(4, 64, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    g = torch.randn(4, 64, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = norm(x1)
    eager.backward(g)
    seen: list[torch.Tensor] = []  # the gradient as handed back (a leaf's .grad is restrided)
    inp = x2.clone()
    inp.register_hook(seen.append)
    compiled = torch.compile(norm)(inp)
    compiled.backward(g)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampling", ["uniform", "error"])
def test_quantizer_training_step_never_waits_for_the_gpu(sampling: str) -> None:
    """Counting, the EMA update and dead-code restarts all stay on the device: a host
    sync per step would leave the GPU idle while Python waits."""
    vq = VectorQuantizerEMA(1024, 16, dead_code_threshold=1.0, restart_sampling=sampling).cuda().train()
    z = torch.randn(8, 16, 16, 16, device="cuda")
    vq(z)  # warm-up (with kmeans_init the first batch may read one flag back)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = vq(z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.z_q).all()
    assert int(out.stats.restarted) > 0  # restarts ran (1,024 codes, 2,048 vectors, threshold 1)


FAMILY_GROUPS = {  # (seed parameters, quantizer group) of each family at 64 codes
    "vq": ({"num_embeddings": 64, "embedding_dim": 32}, {"family": "vq"}),
    "fsq": ({"num_embeddings": 64, "embedding_dim": 3}, {"family": "fsq", "levels": [4, 4, 4]}),
    "lfq": ({"num_embeddings": 64, "embedding_dim": 6}, {"family": "lfq"}),
    "simvq": ({"num_embeddings": 64, "embedding_dim": 32}, {"family": "simvq"}),
    "ibq": ({"num_embeddings": 64, "embedding_dim": 32}, {"family": "ibq"}),
}


@pytest.mark.parametrize("family", list(FAMILY_GROUPS))
def test_every_family_trains_in_bf16_with_weight_ema(tmp_path, family: str) -> None:
    seed, group = FAMILY_GROUPS[family]
    model = VQVAEModel(**merged(SMALL, dict(seed, quantizer=group, optimization={"warmup_steps": 0, "ema_decay": 0.9})))
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    start = model.ema_tokenizer.encoder.stem.weight.detach().clone()
    trainer.fit(model, batches())
    ema, live = model.ema_tokenizer.encoder.stem.weight.detach().cpu(), model.tokenizer.encoder.stem.weight.detach().cpu()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(ema, start) and not torch.equal(ema, live)  # it moved, and lags the live weights


@pytest.mark.parametrize("family", list(FAMILY_GROUPS))
def test_every_family_quantizes_without_waiting_for_the_gpu(family: str) -> None:
    from animevq.nn.config import QuantizerOptions, quantizer_from_flat
    from animevq.nn.quantizers import build_quantizer

    seed, group = FAMILY_GROUPS[family]
    q = build_quantizer(quantizer_from_flat(seed, QuantizerOptions(**group))).cuda().train()
    z = torch.randn(8, q.embedding_dim, 16, 16, device="cuda", requires_grad=True)
    q(z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = q(z.bfloat16())
        total = out.loss + out.z_q.float().square().mean()
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.z_q.dtype == torch.float32 and torch.isfinite(z.grad).all()
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_group_norm_silu_matches_pytorch_on_gpu(compiled: bool) -> None:
    from animevq.kernels.group_norm_silu import fuse_group_norm_silu
    from animevq.nn.blocks import ResBlock
    from animevq.train.speed import speed_up

    torch.manual_seed(0)
    plain = ResBlock(128).cuda().to(memory_format=torch.channels_last)
    fused = ResBlock(128).cuda().to(memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    assert fuse_group_norm_silu(fused) == 2
    x = torch.randn(4, 128, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cuda", torch.bfloat16):
        ya = (torch.compile(plain) if compiled else plain)(xs[0])
        yb = (torch.compile(fused) if compiled else fused)(xs[1])
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    scale = ya.float().abs().max()
    assert ((ya.float() - yb.float()).abs().max() / scale).item() < 2e-2  # bf16 rounding of conv inputs
    assert yb.is_contiguous(memory_format=torch.channels_last)
    dx = xs[0].grad.float().abs().max()
    assert ((xs[0].grad.float() - xs[1].grad.float()).abs().max() / dx).item() < 2e-2
    dw = plain.norm1.weight.grad.abs().max()
    assert ((plain.norm1.weight.grad - fused.norm1.weight.grad).abs().max() / dw).item() < 2e-2
    model = VQVAEModel(**SMALL, speed={"fused_norm": True}).cuda()
    speed_up(model, model.config.speed, on_cuda=True)
    norms = [m for m in model.tokenizer.modules() if hasattr(m, "silu_kernel")]
    assert norms and all(m.silu_kernel is not None for m in norms)


def test_channel_sums_group_norm_compiled_on_gpu_matches_pytorch() -> None:
    from animevq.nn.blocks import CHANNEL_SUMS, ResBlock, set_norm_silu_kernel

    torch.manual_seed(0)
    plain = ResBlock(128).cuda().to(memory_format=torch.channels_last)
    summed = ResBlock(128).cuda().to(memory_format=torch.channels_last)
    summed.load_state_dict(plain.state_dict())
    assert set_norm_silu_kernel(summed, CHANNEL_SUMS) == 2
    x = (torch.randn(4, 128, 32, 32, device="cuda") * 3 + 1).to(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    seen: list[torch.Tensor] = []  # the input gradient as computed (a leaf's .grad is restrided)
    inp = xs[1].clone()
    inp.register_hook(seen.append)
    with torch.autocast("cuda", torch.bfloat16):
        ya = plain(xs[0])  # eager: ATen's kernels
        yb = torch.compile(summed)(inp)  # Inductor, from per-channel sums
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    scale = ya.float().abs().max()
    assert ((ya.float() - yb.float()).abs().max() / scale).item() < 2e-2  # bf16 rounding of conv inputs
    assert yb.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    dx = xs[0].grad.float().abs().max()
    assert ((xs[0].grad.float() - xs[1].grad.float()).abs().max() / dx).item() < 2e-2
    for a, b in ((plain.norm1.weight, summed.norm1.weight), (plain.norm2.bias, summed.norm2.bias)):
        assert ((a.grad - b.grad).abs().max() / a.grad.abs().max()).item() < 2e-2
