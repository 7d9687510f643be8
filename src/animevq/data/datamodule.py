"""``AnimeDataModule``: a folder of illustrations as Lightning train/val dataloaders."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from animevq.data.dataset import EpochSampler, ImageFolderDataset, SkipLedger, SkipReport
from animevq.data.discovery import Discovery, find_images, sample_dir, split_by_hash
from animevq.data.images import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
)
from animevq.data.names import shown
from animevq.data.legacy import is_legacy
from animevq.data.store import INFO_NAME, StoreInfo, is_url, read_info

log = logging.getLogger(__name__)
_warn_once = rank_zero_only(log.warning)
_info_once = rank_zero_only(log.info)

# Enough decoders to feed one H100 at ~500 img/s of 256 px crops from multi-megapixel
# PNG/JPEG files (~25 ms each) with a core left for the training process.
_MAX_DEFAULT_WORKERS = 16


def default_num_workers(devices_per_node: int = 1) -> int:
    """min(16, CPUs available to this process / devices on this node - 1), at least 0."""
    try:
        cpus = len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, devices_per_node)
    return max(0, min(_MAX_DEFAULT_WORKERS, per_rank - 1))


def sigterm_from_parent_only(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker obeys SIGTERM only from the training process.

    ``kill -TERM -PGID``, ``timeout`` and batch schedulers signal every process of the job,
    workers included. A worker that dies of it makes the training process raise "DataLoader
    worker exited unexpectedly" at its next check, even in the middle of writing the
    SIGTERM checkpoint. So the worker blocks SIGTERM and a thread takes each one that
    arrives: from the training process (which terminates its workers on the way out) it
    ends the worker, from anyone else it is dropped. The worker still ends when its loader
    shuts it down, and by itself once the training process is gone. Where Python lacks
    ``signal.sigwaitinfo`` (macOS, Windows) the worker keeps the default.
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: leave the default
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # A mask is per thread. A thread that a library started in the fork, before this call,
    # still takes SIGTERM, and PyTorch's worker handler then ends the worker. Ignored, such
    # a delivery is dropped; a blocked signal is still queued for the wait below.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


class AnimeDataModule(LightningDataModule):
    """Every image under ``data_dir`` (recursively: jpg, jpeg, png, webp, bmp, gif),
    split into train/val by a stable hash of each file's relative path.

    Batches are plain float tensors (B,3,S,S) in [-1,1], S = ``image_size``. Train: resize
    the short side to S, random S×S crop, random horizontal flip; val: resize + centre
    crop. Bad files never stop training: each is loaded correctly (CMYK, 16-bit,
    palette, transparency on white, EXIF rotation, tiny or extreme aspect ratios) or
    skipped with a reason (see :class:`~animevq.data.SkipReason`) and replaced by another
    image, so batch shapes hold. ``skipped`` counts skipped files by reason; add the
    :class:`~animevq.data.DataReport` callback for a warning at each epoch end.

    ``data_dir`` may also be a dataset written by ``animevq prepare SRC DST``, in a folder or
    under an object-store URL (``s3://bucket/prefix``, ``gs://…``; credentials from the
    environment): it is then streamed with LitData (:mod:`animevq.data.streaming`), without
    decoding, split by whole chunks in an order fixed by ``seed``, shuffled per epoch from
    ``seed``, disjoint across ranks and resumable mid-epoch. Remote chunks are downloaded
    ahead into ``cache_dir``, which holds at most ``max_cache_size``. ``image_size`` must not
    exceed the prepared size; the dataset's own ``--min_image_size``, ``--max_image_pixels``
    and ``--max_image_bytes`` apply instead of this module's.

    Args:
        data_dir: folder of images, or a prepared dataset (folder or URL); None uses the
            sample folder shipped in the package.
        batch_size: images per batch (per device).
        val_split: expected fraction of files in validation, in [0, 1). With >= 2 files
            and val_split > 0, val and train each get at least one file.
        image_size: side S of the square crops.
        num_workers: DataLoader worker processes; None picks min(16, CPUs/devices - 1).
        seed: fixes the split, the shuffling order and the augmentation of every epoch.
        pin_memory: None pins when CUDA is available.
        persistent_workers: None keeps workers alive between epochs when there are any.
        max_image_pixels: files whose header claims more pixels are refused undecoded.
        max_image_bytes: files whose decoding and conversion to RGB would hold more bytes
            at once (estimated from the header) are refused undecoded, as ``too_large``.
        min_image_size: files with a shorter side are skipped as ``too_small``.
        random_flip: flip training crops horizontally with probability 1/2.
        drop_last: drop the last incomplete training batch (kept if it is the only one).
        cache_dir: where a prepared dataset's remote chunks are cached (None: LitData's
            default, ``~/.lightning/chunks``); ignored for local data.
        max_cache_size: the most that cache holds, e.g. ``"50GB"`` (None: LitData's rule,
            75 % of the free disk); chunks already read are evicted first.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 32,
        val_split: float = 0.2,
        image_size: int = 256,
        num_workers: int | None = None,
        seed: int = 0,
        *,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        min_image_size: int = DEFAULT_MIN_SIDE,
        random_flip: bool = True,
        drop_last: bool = True,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value, low in (
            ("batch_size", batch_size, 1), ("image_size", image_size, 1),
            ("max_image_pixels", max_image_pixels, 1), ("max_image_bytes", max_image_bytes, 1),
            ("min_image_size", min_image_size, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (automatic), got {num_workers}")
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.batch_size = batch_size
        self.val_split = val_split
        self.image_size = image_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.min_image_size = min_image_size
        self.random_flip = random_flip
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.store: StoreInfo | None = None  # a prepared dataset's description, once set up
        # Filled by setup(); no file I/O in the constructor.
        self.discovery: Discovery | None = None
        self.ledger: SkipLedger | None = None
        self.train_dataset: Any = None  # an ImageFolderDataset, or an ImageStream
        self.val_dataset: Any = None

    def setup(self, stage: str | None = None) -> None:
        """List and split the files (once; later calls reuse the listing)."""
        if self.discovery is not None:
            return
        data_dir = sample_dir() if self.data_dir is None else self.data_dir
        info = read_info(data_dir) if is_url(data_dir) or os.path.isdir(data_dir) else None
        if info is not None:
            self._setup_stream(info)
            return
        if is_url(data_dir):
            raise ValueError(f"data_dir {data_dir} holds no dataset prepared by animevq (no "
                             f"{INFO_NAME}); write one with `animevq prepare SRC {data_dir}`")
        if is_legacy(data_dir):
            raise ValueError(
                f"data_dir {shown(data_dir)} was prepared by animevq 0.1 (memory-mapped shards), "
                f"which this version streams no longer; convert it once with `animevq prepare "
                f"{shown(data_dir)} {shown(str(data_dir).rstrip('/') + '-litdata')}` and train on that"
            )
        discovery = find_images(data_dir)
        split = split_by_hash(discovery.files, self.val_split, self.seed)
        ledger = SkipLedger(len(discovery.files))
        common = dict(
            image_size=self.image_size, seed=self.seed, random_flip=self.random_flip,
            max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes,
            min_side=self.min_image_size,
        )
        self.train_dataset = ImageFolderDataset(
            discovery.root, discovery.files, split.train, ledger, train=True, **common
        )
        self.val_dataset = ImageFolderDataset(
            discovery.root, discovery.files, split.val, ledger, train=False, **common
        )
        self.discovery, self.ledger = discovery, ledger
        _info_once(
            "found %d images under %s: %d train, %d val",
            len(discovery.files), shown(discovery.root), len(split.train), len(split.val),
        )
        if discovery.skipped:
            listing = SkipReport(tuple((path, reason.label) for path, reason in discovery.skipped))
            _warn_once(listing.message(when="while listing data_dir"))

    def _setup_stream(self, info: StoreInfo) -> None:
        """Open the prepared dataset and split it by chunks; files skipped while preparing
        are reported once, here."""
        from animevq.data.streaming import num_items, open_stream, split_stream  # LitData: when used

        stream = open_stream(info, image_size=self.image_size, seed=self.seed,
                             random_flip=self.random_flip, cache_dir=self.cache_dir,
                             max_cache_size=self.max_cache_size)
        self.train_dataset, self.val_dataset = split_stream(stream, self.val_split, self.seed)
        listing = [(item.path, item.skip_reason) for item in info.skipped if item.stage == "listing"]
        self.discovery = Discovery(root=Path(info.location), files=[], skipped=listing)
        self.store = info
        _info_once(
            "streaming %d prepared images (short side %d) from %s: %d train, %d val",
            info.num_images, info.size, shown(info.location), num_items(self.train_dataset),
            num_items(self.val_dataset),
        )
        if info.skipped:
            report = SkipReport(tuple(sorted((item.path, item.reason) for item in info.skipped)))
            _warn_once(report.message(when="while preparing data_dir"))

    def state_dict(self) -> dict[str, int]:
        """What checkpoints record of the data once set up (an export's model card shows it):
        the images trained and validated on. Nothing is restored from it: a resumed run lists
        the folder again."""
        if self.train_dataset is None or self.val_dataset is None:
            return {}
        train, val = self._count(self.train_dataset), self._count(self.val_dataset)
        return {"num_images": train + val, "num_train_images": train}

    def _count(self, dataset: Any) -> int:
        if self.store is None:
            return len(dataset)
        from animevq.data.streaming import num_items

        return num_items(dataset)

    @property
    def files(self) -> list[str]:
        """All usable-looking image paths relative to data_dir, sorted (after setup)."""
        return [] if self.discovery is None else self.discovery.files

    def skip_report(self) -> SkipReport:
        """Every file skipped so far: links refused while listing, plus files that failed
        to load in this process or its workers (under DDP, on any rank once
        :class:`~animevq.data.DataReport` has run an epoch end)."""
        if self.store is not None:
            return SkipReport(tuple(sorted((item.path, item.reason) for item in self.store.skipped)))
        if self.discovery is None or self.ledger is None:
            return SkipReport(())
        listing = [(path, reason.label) for path, reason in self.discovery.skipped]
        loading = SkipReport.from_codes(self.discovery.files, self.ledger.status.to(torch.int32))
        return SkipReport(tuple(sorted(listing + list(loading.files))))

    @property
    def skipped(self) -> dict[str, int]:
        """Skip reason → number of distinct files skipped so far, e.g. ``{"truncated": 1}``."""
        return self.skip_report().counts

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        if self.store is not None:
            return self._stream_loader(self.train_dataset, train=True)
        dataset = self.train_dataset
        drop_last = self.drop_last and len(dataset) >= self.batch_size
        if self.drop_last and not drop_last:
            _warn_once(
                "only %d training images, fewer than batch_size=%d: keeping the one partial "
                "batch instead of dropping it", len(dataset), self.batch_size,
            )
        sampler = EpochSampler(len(dataset), seed=self.seed, shuffle=True)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        if self.store is not None:
            return self._stream_loader(self.val_dataset, train=False)
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, shuffle=False, drop_last=False,
            **self._loader_options(),
        )

    def _stream_loader(self, dataset: Any, train: bool) -> Any:
        """LitData's loader over an :class:`~animevq.data.streaming.ImageStream`. Its workers
        are never persistent: LitData hands each epoch's number to workers as they start."""
        from animevq.data.streaming import StreamLoader, num_items

        options = self._loader_options()
        options["persistent_workers"] = False
        per_batch = self.batch_size * max(1, int(options["num_workers"]))  # each worker batches its own
        drop_last = train and self.drop_last and num_items(dataset) >= per_batch
        return StreamLoader(dataset, batch_size=self.batch_size, drop_last=drop_last, **options)

    def _loader_options(self) -> dict[str, object]:
        workers = self.num_workers
        if workers is None:
            trainer = getattr(self, "trainer", None)
            workers = default_num_workers(trainer.num_devices if trainer is not None else 1)
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        persistent = workers > 0 if self.persistent_workers is None else self.persistent_workers
        return dict(
            num_workers=workers, pin_memory=pin, persistent_workers=persistent and workers > 0,
            worker_init_fn=sigterm_from_parent_only if workers > 0 else None,
        )
