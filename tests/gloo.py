"""Several CPU processes joined by torch.distributed's gloo backend, for the DDP tests.

    spawn_ranks(worker, arg1, arg2)   # runs worker(rank, arg1, arg2) in 2 processes

Each process joins one process group on a free local port before ``worker`` runs and leaves it
after, whatever ``worker`` raises; an exception in any rank fails the caller. ``worker`` must
be a module-level function (spawned processes import it by name).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from ports import HOST, free_port

__all__ = ["spawn_ranks"]


def _joined(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes of one gloo group; wait for all."""
    mp.start_processes(_joined, args=(world, free_port(), worker, args), nprocs=world, join=True,
                       start_method="spawn")
