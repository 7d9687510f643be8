"""Two-GPU DDP failures through `animevq fit` over NCCL (``python -m pytest -m gpu tests/gpu``).

The CPU tests run the same scenarios over gloo, which notices a rank that has gone. NCCL does
not: a rank left alone in a collective waits until the process group times out (30 minutes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from clirun import fit_config, make_images, run_animevq

from animevq.runs.sigterm import EXIT_SIGTERM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def _fit(tmp_path: Path, callbacks: list[dict], num_workers: int = 0, **config):
    data = make_images(tmp_path / "images", n=16)
    run = fit_config(tmp_path / "run", data, accelerator="gpu", devices=2, strategy="ddp", max_epochs=3,
                     logger=False, callbacks=callbacks)
    run["data"].update(batch_size=2, num_workers=num_workers)
    run.update(config)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(run))
    result = run_animevq("fit", "--config", str(tmp_path / "fit.yaml"), cwd=tmp_path, timeout=150)
    return result, tmp_path / "run" / "checkpoints"


@pytest.mark.timeout(180)
def test_nccl_checkpoint_write_failing_on_rank_0_ends_every_rank(tmp_path: Path) -> None:
    full = {"class_path": "reliability_callbacks.DiskFullOnRank", "init_args": {"rank": 0, "batch": 2}}
    result, checkpoints = _fit(tmp_path, [full], save_every_n_steps=2)
    assert result.returncode != 0
    assert "No space left on device (injected on rank 0)" in result.stderr
    assert "animevq fit: error: another rank failed while writing" in result.stderr
    assert result.seconds < 120 and result.leftover == []
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["animevq"]["batches_seen"] == 2


@pytest.mark.timeout(180)
def test_nccl_sigterm_to_the_whole_process_group_with_loader_workers_saves_and_exits_143(tmp_path: Path) -> None:
    kill = {"class_path": "reliability_callbacks.SigtermGroupAt", "init_args": {"batch": 4}}
    result, checkpoints = _fit(tmp_path, [kill], num_workers=2)
    assert result.returncode == EXIT_SIGTERM, result.stderr[-4000:]
    assert "killed by signal" not in result.stderr and "exited unexpectedly" not in result.stderr
    assert result.seconds < 120 and result.leftover == []
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["animevq"]["batches_seen"] == 5
