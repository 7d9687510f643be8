"""Helpers of the training tests: a logger that keeps what it is sent, poisoned batches,
and comparisons of nested states."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from conftest import model_kwargs, tiny_trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

IMAGES = 16  # (16,3,32,32) random images, batch size 2: 8 batches per epoch


class CaptureLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


class PoisonBatches(pl.Callback):
    """Fills the images of chosen batches (by ``batches_seen``) with NaN, and keeps a copy
    of the model's and optimizer's state as the first poisoned batch starts."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.before: dict[str, torch.Tensor] | None = None
        self.adam_before: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.batches_seen in self.batches:
            if self.before is None:
                self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.adam_before = clone_tree(trainer.optimizers[0].state_dict()["state"])
            batch[0].fill_(float("nan"))


def clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    return tree


def equal_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_tree(a[k], b[k]) for k in a)
    return a == b


def images_loader() -> DataLoader:
    images = torch.rand(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(images), batch_size=2)


def fit(model: pl.LightningModule, callbacks: list, *, max_steps: int, logger: Logger | bool = False,
         ckpt_path: str | None = None) -> pl.Trainer:
    trainer = tiny_trainer(max_epochs=None, max_steps=max_steps, logger=logger, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=images_loader(), ckpt_path=ckpt_path)
    return trainer




def logging_model(**overrides):
    """The tiny model logging every batch (images never)."""
    from animevq import VQVAEModel

    return VQVAEModel(**model_kwargs(log_every_n_steps=1, log_images_every_n_steps=1000, **overrides))
