"""The smallest LightningModule that trains on AnimeDataModule batches, for data tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class Probe(pl.LightningModule):
    """Fits one scalar to the batch mean; records the shape of every training and validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.level = torch.nn.Parameter(torch.zeros(()))
        self.shapes: list[tuple[int, ...]] = []
        self.val_shapes: list[tuple[int, ...]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.shapes.append(tuple(batch.shape))
        return (batch.mean() - self.level) ** 2

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_shapes.append(tuple(batch.shape))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
