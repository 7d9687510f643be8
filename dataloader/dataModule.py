"""Thin re-export for the seed's import path; the code lives in :mod:`animevq.data`.

    from dataloader.dataModule import AnimeDataModule
"""

from __future__ import annotations

from animevq.data import AnimeDataModule, DataReport

__all__ = ["AnimeDataModule", "DataReport"]
