"""Data: robust image decoding, the image-folder dataset and ``AnimeDataModule``, and the
prepared LitData datasets (``animevq prepare``) that it streams without decoding.

Batches are float tensors (B,3,S,S) in [-1,1]. Files that cannot be used are skipped with
a :class:`SkipReason`, counted in ``AnimeDataModule.skipped`` and reported each epoch by
the :class:`DataReport` callback.
"""

from __future__ import annotations

import os

# LitData asks PyPI for a newer version of itself (30 s timeout) at each first use; animevq
# never reaches the network on its own, and clusters without internet would wait each run.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

from animevq.data.datamodule import AnimeDataModule, default_num_workers
from animevq.data.dataset import EpochSampler, ImageFolderDataset, SampleKey, SkipLedger, SkipReport
from animevq.data.discovery import Discovery, Split, find_images, sample_dir, split_by_hash
from animevq.data.images import (
    IMAGE_EXTENSIONS,
    ImageSkipped,
    SkipReason,
    load_image,
    to_rgb,
)
from animevq.data.prepare import PrepareOptions, PrepareResult, prepare_folder
from animevq.data.store import SkippedFile, StoreInfo, is_url, read_info
from animevq.data.report import DataReport
from animevq.data.resumable import LoaderPosition, ResumableDataLoader, make_resumable
from animevq.data.transforms import crop_resize, resize_box, to_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "AnimeDataModule",
    "DataReport",
    "Discovery",
    "EpochSampler",
    "ImageFolderDataset",
    "ImageSkipped",
    "LoaderPosition",
    "PrepareOptions",
    "PrepareResult",
    "SkippedFile",
    "StoreInfo",
    "ResumableDataLoader",
    "SampleKey",
    "SkipLedger",
    "SkipReason",
    "SkipReport",
    "Split",
    "crop_resize",
    "default_num_workers",
    "find_images",
    "is_url",
    "load_image",
    "make_resumable",
    "prepare_folder",
    "read_info",
    "resize_box",
    "sample_dir",
    "split_by_hash",
    "to_rgb",
    "to_tensor",
]
