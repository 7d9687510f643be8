"""Where a prepared dataset lives and what describes it.

A prepared dataset is a LitData dataset (``index.json`` and ``chunk-*.bin``, written by
``litdata.optimize``: one item per good image, a uint8 (H,W,3) array) in a local folder or
under an object-store URL (``s3://bucket/prefix``, ``gs://…``), plus ``animevq.json``: the
format, the stored short side, the source and options, and the files left out with their
reasons. ``animevq.json`` is written last, so its presence marks a complete dataset.

Both files are read as untrusted input: :func:`read_info` refuses a description of the
wrong structure in one line that names it and says to re-run ``animevq prepare``.
Credentials for a URL come from the environment, as LitData (boto3, google-cloud-storage)
reads them: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from animevq.data.images import SkipReason
from animevq.data.names import shown

FORMAT_NAME = "animevq-litdata"
FORMAT_VERSION = 1
INFO_NAME = "animevq.json"
INDEX_NAME = "index.json"  # LitData's
_SCHEMES = ("s3://", "gs://", "gcs://", "r2://", "azure://", "hf://")
_MAX_INFO_BYTES = 256 << 20  # a description of 256 MiB lists millions of skipped files already


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names object storage rather than a local folder."""
    return str(location).startswith(_SCHEMES)


def normalized(location: str | os.PathLike[str]) -> str:
    """A URL without its trailing slash, or an absolute local path."""
    text = os.fspath(location)
    return text.rstrip("/") if is_url(text) else str(Path(text).expanduser().absolute())


class SkippedFile(NamedTuple):
    """A source file left out: ``stage`` is "listing" (a refused link, never part of the
    dataset) or "loading" (listed, then found unusable)."""

    path: str
    reason: str  # a SkipReason label, e.g. "truncated"
    detail: str
    stage: str

    @property
    def skip_reason(self) -> SkipReason:
        return SkipReason[self.reason.upper()]


@dataclass(frozen=True)
class StoreInfo:
    """What ``animevq.json`` says of a prepared dataset."""

    location: str  # normalized(): an absolute path or a URL
    size: int  # the short side every image was stored at
    num_images: int
    source: str
    options: dict[str, Any]
    skipped: tuple[SkippedFile, ...]

    def to_json(self) -> str:
        counts: dict[str, int] = {}
        for item in self.skipped:
            counts[item.reason] = counts.get(item.reason, 0) + 1
        return json.dumps({
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "size": self.size,
            "layout": "LitData items: uint8 (H,W,3), short side = size", "source": self.source,
            "options": self.options, "num_images": self.num_images,
            "num_skipped": len(self.skipped), "skipped_counts": counts,
            "skipped": [item._asdict() for item in self.skipped],
        }, indent=1)


def _fs(location: str) -> Any:
    from litdata.streaming.fs_provider import _get_fs_provider  # LitData's s3/gs/r2 clients

    allow_plain_http()
    return _get_fs_provider(location, None)


def allow_plain_http() -> None:
    """Let LitData's chunk transfers (obstore) use an ``http://`` endpoint such as MinIO or
    a local server. LitData builds its S3 store with explicit client options, which drop
    the ``AWS_ALLOW_HTTP`` that obstore would read from the environment; forked workers
    inherit the setting made here. Called before any prepared URL is read or written."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    if not (endpoint.startswith("http://")
            or os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes")):
        return
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options.setdefault("allow_http", True)


def read_text(location: str, name: str) -> str | None:
    """The text of ``location/name``, or None where there is no such file.

    Raises:
        ValueError: the file is larger than a description can be.
    """
    if not is_url(location):
        file = Path(location) / name
        if not file.is_file():
            return None
        if file.stat().st_size > _MAX_INFO_BYTES:
            raise ValueError(f"{shown(file)} is over {_MAX_INFO_BYTES >> 20} MiB; not a description")
        return file.read_text(encoding="utf-8")
    fs, remote = _fs(location), f"{location}/{name}"
    if not fs.exists(remote):
        return None
    with tempfile.TemporaryDirectory(prefix="animevq-") as folder:
        local = os.path.join(folder, name)
        fs.download_file(remote, local)
        if os.path.getsize(local) > _MAX_INFO_BYTES:
            raise ValueError(f"{remote} is over {_MAX_INFO_BYTES >> 20} MiB; not a description")
        return Path(local).read_text(encoding="utf-8")


def write_text(location: str, name: str, text: str) -> None:
    """Write ``location/name`` whole: through a temporary file and a rename locally, one
    upload remotely (an object appears whole or not at all)."""
    if not is_url(location):
        part = Path(location) / f".{name}.part"
        part.write_text(text, encoding="utf-8")
        os.replace(part, Path(location) / name)
        return
    with tempfile.TemporaryDirectory(prefix="animevq-") as folder:
        local = os.path.join(folder, name)
        Path(local).write_text(text, encoding="utf-8")
        _fs(location).upload_file(local, f"{location}/{name}")


def read_info(location: str | os.PathLike[str]) -> StoreInfo | None:
    """The description of the prepared dataset at ``location``, or None if there is none
    (a folder or URL without ``animevq.json``).

    Raises:
        ValueError: ``animevq.json`` is not a readable description, or was written by a
            newer animevq; the message names it and says what to run.
    """
    where = normalized(location)
    text = read_text(where, INFO_NAME)
    if text is None:
        return None
    redo = f"re-run `animevq prepare SRC {shown(where)} --overwrite`"
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{shown(where)}/{INFO_NAME} is not JSON ({error}); {redo}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ValueError(f"{shown(where)}/{INFO_NAME} is not an animevq dataset description; {redo}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ValueError(
            f"{shown(where)} was prepared by a newer animevq (format {version!r}, this one reads up "
            f"to {FORMAT_VERSION}); upgrade animevq or {redo}"
        )
    problem = _problem(data)
    if problem:
        raise ValueError(f"{shown(where)}/{INFO_NAME}: {problem}; {redo}")
    return StoreInfo(
        location=where, size=data["size"], num_images=data["num_images"],
        source=data["source"], options=data["options"],
        skipped=tuple(SkippedFile(**item) for item in data["skipped"]),
    )


def _problem(data: dict[str, Any]) -> str | None:
    """What is malformed in the fields that reading uses, or None."""
    def counts(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_skipped(item: object) -> bool:
        return (isinstance(item, dict) and set(item) == set(SkippedFile._fields)
                and all(isinstance(value, str) for value in item.values())
                and item["reason"] in {reason.label for reason in SkipReason})

    if not (counts(data.get("num_images")) and counts(data.get("size")) and data["size"] > 0):
        return "num_images and size must be whole numbers (size > 0)"
    if not isinstance(data.get("source"), str) or not isinstance(data.get("options"), dict):
        return "source must be a string and options an object"
    skipped = data.get("skipped")
    if not isinstance(skipped, list) or not all(is_skipped(item) for item in skipped):
        return f"skipped must list {{{', '.join(SkippedFile._fields)}}} entries with known reasons"
    return None
