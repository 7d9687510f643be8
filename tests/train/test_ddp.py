"""Codebooks under torch.distributed: 2 CPU processes (gloo), each with its own data."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from conftest import model_kwargs, tiny_trainer
from gloo import spawn_ranks

from animevq.nn.quantizers import VectorQuantizerEMA
from animevq.train.module import VQVAEModel

WORLD = 2
STEPS = 12
K, D = 16, 4


def batches(collapse: bool) -> list[torch.Tensor]:
    """(WORLD·2, D, 2, 3) global batches; rank r takes rows 2r, 2r+1."""
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(STEPS):
        z = torch.randn(WORLD * 2, D, 2, 3, generator=g) * (1 + step % 3)
        if collapse and step < STEPS // 2:
            z = torch.zeros_like(z) + 0.5  # every vector at one point: all codes but one die
        out.append(z)
    return out


def make_quantizer(sampling: str = "error") -> VectorQuantizerEMA:
    torch.manual_seed(3)
    return VectorQuantizerEMA(K, D, decay=0.8, dead_code_threshold=0.5, restart_sampling=sampling).train()


def worker(rank: int, collapse: bool, result_dir: str, sampling: str = "error") -> None:
    vq = make_quantizer(sampling)
    history = []
    for z in batches(collapse):
        local = z[2 * rank : 2 * rank + 2]
        vq(local)
        state = torch.cat([vq.codebook.flatten(), vq.cluster_size, vq.embed_sum.flatten()])
        gathered = [torch.empty_like(state) for _ in range(WORLD)]
        dist.all_gather(gathered, state)
        assert torch.equal(gathered[0], gathered[1]), f"ranks differ after step {len(history)}"
        history.append(state)
    torch.save(torch.stack(history), Path(result_dir) / f"rank{rank}.pt")


def run_ranks(tmp_path: Path, collapse: bool, sampling: str = "error") -> torch.Tensor:
    spawn_ranks(worker, collapse, str(tmp_path), sampling, world=WORLD)
    return torch.load(tmp_path / "rank0.pt")


def single_process(collapse: bool, sampling: str = "error") -> torch.Tensor:
    vq = make_quantizer(sampling)
    history = []
    for z in batches(collapse):
        vq(z)
        history.append(torch.cat([vq.codebook.flatten(), vq.cluster_size, vq.embed_sum.flatten()]))
    return torch.stack(history)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("collapse", "sampling"), [(False, "error"), (True, "error"), (False, "uniform")])
def test_ranks_identical_and_equal_to_one_process_on_the_global_batch(tmp_path, collapse: bool, sampling: str) -> None:
    distributed = run_ranks(tmp_path, collapse, sampling)
    reference = single_process(collapse, sampling)
    assert torch.allclose(distributed, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.timeout(120)
def test_collapse_revives_dead_codes_identically(tmp_path) -> None:
    history = run_ranks(tmp_path, collapse=True)
    codebooks = history[:, : K * D].view(STEPS, K, D)
    # During the collapse the dead codes are restarted to the collapse point ...
    at_point = (codebooks[STEPS // 2 - 1] - 0.5).abs().amax(1) < 1e-3  # Laplace smoothing: ~ε/N off
    assert at_point.sum() > 1
    # ... and once real data returns, restarts spread them out again.
    final = codebooks[-1]
    assert torch.unique(final.round(decimals=5), dim=0).shape[0] > K // 2


class EndProcessGroup(pl.Callback):
    """Destroy each spawned rank's process group when fit ends. Left to the interpreter's
    exit, gloo's threads were sometimes torn down while running: "terminate called without
    an active exception" and a SIGABRT of the worker, after a fit that had passed."""

    def teardown(self, trainer, pl_module, stage):
        if dist.is_initialized():
            dist.destroy_process_group()


class CodebooksAgree(pl.Callback):
    """After every batch, every rank holds the same codebook and EMA state, though each saw its own data."""

    def __init__(self, record: Path) -> None:
        self.record = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        q = pl_module.tokenizer.quantizer
        state = torch.cat([q.codebook.flatten(), q.cluster_size, q.embed_sum.flatten()])
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), f"ranks differ after batch {batch_idx}"
        images = trainer.strategy.all_gather(batch)
        assert not torch.equal(images[0], images[1])
        with open(self.record, "a") as f:
            f.write(f"{trainer.global_rank} {batch_idx}\n")


@pytest.mark.timeout(180)
def test_lightning_ddp_fit_keeps_codebooks_identical(tmp_path) -> None:
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    model = VQVAEModel(**model_kwargs(log_every_n_steps=1))
    trainer = tiny_trainer(devices=WORLD, strategy="ddp_spawn", default_root_dir=tmp_path,
                           callbacks=[CodebooksAgree(tmp_path / "checked.txt"), EndProcessGroup()])
    trainer.fit(model, DataLoader(images, batch_size=2))
    checked = sorted((tmp_path / "checked.txt").read_text().split("\n")[:-1])
    assert checked == sorted(f"{r} {b}" for r in range(WORLD) for b in range(16 // (2 * WORLD)))


class DiscriminatorsAgree(pl.Callback):
    """VQ-GAN under DDP: both optimisers step and every rank keeps the same weights (the weight EMA's too)."""

    def __init__(self, record: Path) -> None:
        self.record = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        discriminator = pl_module.objective.discriminator
        parts = [("discriminator", discriminator), ("decoder", pl_module.tokenizer.decoder),
                 ("EMA decoder", pl_module.ema_tokenizer.decoder)]
        for name, module in parts:
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = trainer.strategy.all_gather(flat)
            assert torch.equal(gathered[0], gathered[1]), f"{name} differs across ranks after batch {batch_idx}"
        with open(self.record, "a") as f:
            f.write(f"{trainer.global_rank} {batch_idx} {float(discriminator.main[0].weight.sum())}\n")


@pytest.mark.timeout(180)
def test_vqgan_trains_under_ddp(tmp_path) -> None:
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    model = VQVAEModel(**model_kwargs(lambda_gan=0.5, adversarial={"disc_start": 1, "disc_norm": "group"},
                                      optimization={"warmup_steps": 0, "ema_decay": 0.9}))
    trainer = tiny_trainer(devices=WORLD, strategy="ddp_spawn", default_root_dir=tmp_path,
                           callbacks=[DiscriminatorsAgree(tmp_path / "gan.txt"), EndProcessGroup()])
    trainer.fit(model, DataLoader(images, batch_size=2))
    rows = [line.split() for line in (tmp_path / "gan.txt").read_text().splitlines()]
    assert sorted((r[0], r[1]) for r in rows) == sorted((str(r), str(b)) for r in range(WORLD) for b in range(3))
    sums = {(r, b): s for r, b, s in rows}
    assert sums[("0", "1")] != sums[("0", "0")] and sums[("0", "2")] != sums[("0", "1")]  # the discriminator steps from batch 1
