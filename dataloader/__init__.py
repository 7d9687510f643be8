"""The seed's import path for the data module: ``from dataloader.dataModule import
AnimeDataModule``. The implementation lives in :mod:`animevq.data`."""
