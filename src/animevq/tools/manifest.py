"""Token folders: ``manifest.json`` and its ``codes-NNNNN.npy`` shards, written by ``animevq
encode`` and read, as untrusted input, by ``decode`` and by a rerun of ``encode``.

Everything a manifest says is checked before anything is allocated or written: its fields and
their types, shard names (bare ``codes-NNNNN.npy``, so no shard is read from elsewhere), offsets
and counts that tile the file list, file names that stay inside the output folder and are
unique, the grid against the model, and each shard's header (shape and integer dtype) against
its entry, read without loading the array. Shards are then read through a memory map, a batch
at a time, so memory stays bounded whatever a shard claims.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np

from ..nn.tokenizer import write_whole

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "CODE_DTYPES",
    "Shard",
    "check_manifest",
    "read_manifest",
    "shard_batches",
    "sha256_file",
    "write_json",
    "write_shard",
]

FORMAT = "animevq.codes/1"
MANIFEST_NAME = "manifest.json"
CODE_DTYPES = ("int16", "int32")  # what encode writes; anything else (float, bool, complex) is refused
MAX_GRID_SIDE = 1024  # codes per side: 16,384-px images at 16× downsampling
_SHARD_NAME = "codes-{:05d}.npy"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Shard(NamedTuple):
    """One checked shard entry."""

    path: Path
    offset: int  # its first row's index into the manifest's files
    count: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_whole(path, (json.dumps(value, indent=1) + "\n").encode())  # an interrupted run never leaves half a manifest


def write_shard(out: Path, index: int, codes: np.ndarray, offset: int, sources: list[int]) -> dict[str, Any]:
    """Write codes (n,h,w) atomically as shard ``index``; returns its manifest entry."""
    name = _SHARD_NAME.format(index)
    encoded = io.BytesIO()
    np.save(encoded, codes)
    data = encoded.getvalue()
    write_whole(out / name, data)
    return {"name": name, "sources": sources, "offset": offset, "count": len(codes),
            "sha256": hashlib.sha256(data).hexdigest()}  # of the bytes just written, not read back


def read_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    """The JSON of a token folder's manifest, with errors naming the file."""
    path = Path(tokens_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{tokens_dir} holds no {MANIFEST_NAME}; create token folders with `animevq encode`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `animevq encode` into a new folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not an animevq token manifest (format {found!r})")
    return manifest


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} is malformed: {problem}; re-run `animevq encode` into a new folder")


def _check_file_name(name: Any) -> bool:
    """A relative path of plain parts: no absolute path, no '..', nothing empty."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def check_manifest(tokens_dir: str | Path, manifest: dict[str, Any], *, downsample_factor: int,
                   codebook_size: int, headers: bool = True) -> list[Shard]:
    """Check every field of ``manifest`` (see the module docstring) and, with ``headers``, each
    shard's header; returns the shards in order. Reads no array data.

    Raises:
        ValueError: naming the manifest or shard and what is wrong with it.
    """
    folder = Path(tokens_dir)
    path = folder / MANIFEST_NAME
    kinds = {"model_sha256": str, "num_embeddings": int, "grid": list, "image_size": int, "dtype": str,
             "files": list, "shards": list, "skipped": list, "complete": bool}
    for key, kind in kinds.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _fail(path, f"{key!r} must be a {kind.__name__}, got {value!r:.80}")
    if manifest["num_embeddings"] != codebook_size:
        raise ValueError(f"tokens in {folder} use a codebook of {manifest['num_embeddings']} codes but the model has "
                         f"{codebook_size}; decode with the checkpoint that encoded them")
    if manifest["dtype"] not in CODE_DTYPES:
        raise _fail(path, f"dtype {manifest['dtype']!r} is not one of {CODE_DTYPES}")
    grid, size = manifest["grid"], manifest["image_size"]
    side = size // downsample_factor if size > 0 and size % downsample_factor == 0 else None
    if (len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
            or side is None or grid != [side, side] or side > MAX_GRID_SIDE):
        raise _fail(path, f"grid {grid!r:.40} does not fit image_size {size!r} and this model's "
                          f"{downsample_factor}× downsampling (at most {MAX_GRID_SIDE} codes a side)")
    files = manifest["files"]
    bad = next((f for f in files if not _check_file_name(f)), None)
    if bad is not None:
        raise _fail(path, f"file name {bad!r:.120} is not a relative path inside the folder")
    if len(set(files)) != len(files):
        duplicate = next(f for i, f in enumerate(files) if f in files[:i])
        raise _fail(path, f"file {duplicate!r:.120} is listed twice")
    shards, offset = [], 0
    for i, entry in enumerate(manifest["shards"]):
        name = _SHARD_NAME.format(i)
        if not isinstance(entry, dict) or entry.get("name") != name:
            raise _fail(path, f"shard {i} must be named {name!r}")
        count, sha = entry.get("count"), entry.get("sha256")
        if entry.get("offset") != offset or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise _fail(path, f"shard {name} must start at row {offset} with a count >= 0, "
                              f"got offset {entry.get('offset')!r:.40}, count {count!r:.40}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise _fail(path, f"shard {name} has no sha256")
        shards.append(Shard(folder / name, offset, count, sha))
        offset += count
    if offset > len(files):
        raise _fail(path, f"its shards hold {offset} rows but it lists {len(files)} files")
    for shard in shards if headers else ():
        _check_shard_header(shard, manifest["dtype"], tuple(grid))
    return shards


def _check_shard_header(shard: Shard, dtype: str, grid: tuple[int, int]) -> None:
    """The shard's .npy header (shape, dtype) against its entry, without reading its data."""
    if not shard.path.is_file():
        raise ValueError(f"shard {shard.path} is missing; re-run `animevq encode` into {shard.path.parent}")
    try:
        codes = np.load(shard.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"shard {shard.path} is not a readable .npy array ({error}); "
                         f"re-run `animevq encode` into {shard.path.parent}") from None
    expected = (shard.count, *grid)
    if codes.dtype != np.dtype(dtype) or codes.shape != expected:
        raise ValueError(f"shard {shard.path} holds a {codes.dtype} array of shape {codes.shape}, not the "
                         f"{dtype} {expected} its manifest says; re-run `animevq encode` into {shard.path.parent}")


def shard_batches(shard: Shard, batch_size: int, codebook_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, int64 codes (b,h,w)) of a checked shard, read a batch at a time through a
    memory map after its checksum matched; codes outside [0, K) are refused naming the shard."""
    if sha256_file(shard.path) != shard.sha256:
        raise ValueError(f"shard {shard.path} changed since encoding (its sha256 differs); "
                         f"re-run `animevq encode` into {shard.path.parent}")
    codes = np.load(shard.path, mmap_mode="r", allow_pickle=False)
    for start in range(0, shard.count, batch_size):
        batch = np.asarray(codes[start : start + batch_size], dtype=np.int64)
        if batch.size and (batch.min() < 0 or batch.max() >= codebook_size):
            raise ValueError(f"shard {shard.path} holds codes outside [0, {codebook_size}) in rows "
                             f"{start}–{start + len(batch) - 1}; re-run `animevq encode` into {shard.path.parent}")
        yield start, batch
