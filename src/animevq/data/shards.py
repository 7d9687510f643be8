"""Shard writing for ``animevq prepare``, with a journal that makes it resumable.

Images go into ``shard-00000.bin``, ``shard-00001.bin``, … inside the temporary folder.
When a shard is full it is flushed to disk, then one line is appended to
``journal.jsonl``: the shard's size, the images in it and the files skipped since the
previous line, and the position in the sorted source listing reached. The journal's
first line is a header (source, options, a digest of the listing); a later run with the
same header replays the lines, drops the unfinished shard and continues from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from animevq.data.names import shown
from animevq.data.prepared import MANIFEST_NAME, shard_name

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"


def listing_digest(files: list[str]) -> str:
    """A digest of the sorted source listing: a resumed run must see the same files."""
    text = "\0".join(files).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _is_ours(folder: Path) -> bool:
    names = (JOURNAL_NAME, MANIFEST_NAME, MANIFEST_NAME + ".part")
    return any((folder / name).exists() for name in names)


class ShardWriter:
    """Appends images to shard files and journals each finished shard.

    After the last :meth:`close_shard`, ``images`` holds (source position, shard, byte
    offset, height, width) per image, ``skipped`` (source position, reason, detail) per
    refused file and ``shard_sizes`` the byte size of every shard.
    """

    def __init__(self, folder: Path, header: dict[str, Any]) -> None:
        self.folder = folder
        self.header = header
        self.next_file = 0  # source position every journaled shard has covered
        self.shard = 0  # number of the shard being filled
        self.shard_used = 0  # its bytes so far
        self.images: list[tuple[int, int, int, int, int]] = []
        self.skipped: list[tuple[int, str, str]] = []
        self.shard_sizes: list[int] = []
        self._journaled = (0, 0)  # len(images), len(skipped) covered by the journal
        self._file: BinaryIO | None = None

    @classmethod
    def open(cls, folder: Path, header: dict[str, Any]) -> ShardWriter:
        """Resume the run journaled in ``folder`` if it had the same header, else start one.

        Raises:
            ValueError: ``folder`` holds files that are not ours, or cannot be created.
        """
        writer = cls(folder, header)
        if folder.exists():
            if not folder.is_dir() or (any(folder.iterdir()) and not _is_ours(folder)):
                raise ValueError(
                    f"{shown(folder)} exists and was not written by animevq prepare; "
                    "move or remove it"
                )
            if writer._replay():
                return writer
            shutil.rmtree(folder)
        try:
            folder.mkdir(parents=True)
            writer._rewrite_journal([])
        except OSError as error:
            raise ValueError(
                f"cannot write the prepared folder: {error}; choose a DST in a writable place"
            ) from error
        return writer

    def _replay(self) -> bool:
        """Load the finished shards of an interrupted run with this header; False if none."""
        try:
            lines = (self.folder / JOURNAL_NAME).read_text(encoding="utf-8").splitlines()
            if not lines or json.loads(lines[0]) != self.header:
                log.info("discarding %s: interrupted with other settings or files",
                         shown(self.folder))
                return False
        except (OSError, ValueError):
            return False
        entries = []
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:  # the line being written when the run stopped
                break
            file = self.folder / shard_name(entry["shard"])
            if not file.is_file() or file.stat().st_size < entry["bytes"]:
                break
            entries.append(entry)
            self.shard_sizes.append(entry["bytes"])
            self.images.extend(tuple(row) for row in entry["images"])
            self.skipped.extend(tuple(row) for row in entry["skipped"])
            self.next_file, self.shard = entry["next"], entry["shard"] + 1
        for stale in self.folder.glob("shard-*.bin"):  # the unfinished shard, if any
            if int(stale.stem.split("-")[1]) >= self.shard:
                stale.unlink()
        self._journaled = (len(self.images), len(self.skipped))
        self._rewrite_journal(entries)
        log.info("resuming %s after %d files (%d shards)", shown(self.folder), self.next_file,
                 self.shard)
        return True

    def _rewrite_journal(self, entries: list[dict[str, Any]]) -> None:
        part = self.folder / (JOURNAL_NAME + ".part")
        lines = [json.dumps(self.header)] + [json.dumps(entry) for entry in entries]
        part.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(part, self.folder / JOURNAL_NAME)

    def skip(self, position: int, reason: str, detail: str) -> None:
        self.skipped.append((position, reason, detail))

    def add(self, position: int, pixels: np.ndarray) -> None:
        """Append one image, uint8 (H,W,3), to the current shard."""
        if self._file is None:
            self._file = open(self.folder / shard_name(self.shard), "wb")  # noqa: SIM115
        height, width = pixels.shape[:2]
        self.images.append((position, self.shard, self.shard_used, height, width))
        self._file.write(np.ascontiguousarray(pixels, dtype=np.uint8).data)
        self.shard_used += pixels.nbytes

    def close_shard(self, next_file: int) -> None:
        """Finish the current shard (if it holds anything) and journal it: every source
        file before ``next_file`` is then done."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the journal says so
        self._file.close()
        self._file = None
        done_images, done_skipped = self._journaled
        entry = {
            "shard": self.shard, "bytes": self.shard_used, "next": next_file,
            "images": self.images[done_images:], "skipped": self.skipped[done_skipped:],
        }
        with open(self.folder / JOURNAL_NAME, "a", encoding="utf-8") as journal:
            journal.write(json.dumps(entry) + "\n")
        self._journaled = (len(self.images), len(self.skipped))
        self.shard_sizes.append(self.shard_used)
        self.next_file, self.shard, self.shard_used = next_file, self.shard + 1, 0
