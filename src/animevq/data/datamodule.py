"""``AnimeDataModule``: a folder of illustrations as Lightning train/val dataloaders."""

from __future__ import annotations

import logging
import os
import signal
import threading

import numpy as np
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
    SkipReason,
)
from animevq.data.names import shown
from animevq.data.prepared import (
    INDEX_NAME,
    PreparedDataset,
    PreparedFolder,
    is_prepared,
    read_prepared,
)

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

    ``data_dir`` may also be a folder written by ``animevq prepare SRC DST`` (it has a
    ``manifest.json``): images are then read from memory-mapped shards without decoding,
    with the same split (by source path), the same augmentation draws and the same
    validation crops as ``SRC`` itself; files skipped while preparing are reported as
    skipped. ``image_size`` must not exceed the prepared size; the prepared folder's own
    ``--min_image_size``, ``--max_image_pixels`` and ``--max_image_bytes`` apply instead of
    this module's.

    Args:
        data_dir: folder of images, or a prepared folder; None uses the sample folder
            shipped in the package.
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
        # Filled by setup(); no file I/O in the constructor.
        self.discovery: Discovery | None = None
        self.ledger: SkipLedger | None = None
        self.train_dataset: ImageFolderDataset | PreparedDataset | None = None
        self.val_dataset: ImageFolderDataset | PreparedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """List and split the files (once; later calls reuse the listing)."""
        if self.discovery is not None:
            return
        data_dir = sample_dir() if self.data_dir is None else self.data_dir
        if is_prepared(data_dir):
            self._setup_prepared(read_prepared(data_dir))
            return
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

    def _setup_prepared(self, folder: PreparedFolder) -> None:
        """Split the source listing exactly as for the raw folder, then keep the stored
        images; the ledger starts with the files skipped while preparing."""
        files = folder.files  # the raw folder's listing: stored + skipped while loading
        split = split_by_hash(files, self.val_split, self.seed)
        rows = folder.file_rows  # (len(files),) -1 where skipped
        ledger = SkipLedger(len(files))
        position = {path: i for i, path in enumerate(files)}
        for item in folder.skipped:
            if item.stage == "loading":
                ledger.status[position[item.path]] = int(item.skip_reason)
        bad_rows = np.flatnonzero(folder.bad_rows)
        for row in bad_rows:  # stored, but unreadable: replaced like bad files when drawn
            ledger.status[position[folder.paths[row]]] = int(SkipReason.BAD_INDEX_ROW)
        if len(bad_rows):
            listed = "; ".join(folder.row_problem(int(row)) for row in bad_rows[:3])
            _warn_once(
                f"{shown(folder.root / INDEX_NAME)}: {len(bad_rows)} damaged row(s) skipped "
                f"({listed}"
                f"{'; …' if len(bad_rows) > 3 else ''}); re-run `animevq prepare SRC "
                f"{shown(folder.root)} --overwrite` to rebuild it"
            )
        train = [i for i in split.train if rows[i] >= 0]
        val = [i for i in split.val if rows[i] >= 0]
        if not any(not folder.bad_rows[rows[i]] for i in train):
            raise ValueError(
                f"data_dir {shown(folder.root)} has no readable stored image in the training split "
                f"({len(folder.paths)} stored in all, {len(bad_rows)} with damaged index rows); "
                "lower val_split, add images or re-run `animevq prepare`"
            )
        common = dict(image_size=self.image_size, seed=self.seed, random_flip=self.random_flip,
                      ledger=ledger)
        self.train_dataset = PreparedDataset(folder, train, train=True, **common)
        self.val_dataset = PreparedDataset(folder, val, train=False, **common)
        listing = [(item.path, item.skip_reason) for item in folder.skipped
                   if item.stage == "listing"]
        self.discovery = Discovery(root=folder.root, files=files, skipped=listing)
        self.ledger = ledger
        _info_once(
            "found %d prepared images (short side %d) under %s: %d train, %d val",
            len(folder.paths), folder.size, shown(folder.root), len(train), len(val),
        )
        if folder.skipped:
            report = SkipReport(tuple(sorted((item.path, item.reason) for item in folder.skipped)))
            _warn_once(report.message(when="while preparing data_dir"))

    def state_dict(self) -> dict[str, int]:
        """What checkpoints record of the data once set up (an export's model card shows it):
        the images trained and validated on. Nothing is restored from it: a resumed run lists
        the folder again."""
        if self.train_dataset is None or self.val_dataset is None:
            return {}
        return {"num_images": len(self.train_dataset) + len(self.val_dataset),
                "num_train_images": len(self.train_dataset)}

    @property
    def files(self) -> list[str]:
        """All usable-looking image paths relative to data_dir, sorted (after setup)."""
        return [] if self.discovery is None else self.discovery.files

    def skip_report(self) -> SkipReport:
        """Every file skipped so far: links refused while listing, plus files that failed
        to load in this process or its workers (under DDP, on any rank once
        :class:`~animevq.data.DataReport` has run an epoch end)."""
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
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, shuffle=False, drop_last=False,
            **self._loader_options(),
        )

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
