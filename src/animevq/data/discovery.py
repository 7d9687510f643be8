"""Finding images under a folder and splitting them into train/val by a stable hash.

The split assigns each file by a hash of its path relative to ``data_dir`` (and the seed),
never by its position in a shuffled list: adding images to another subfolder leaves the
split of every existing file unchanged, so validation numbers stay comparable as a
dataset grows.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from animevq.data.images import IMAGE_EXTENSIONS, SkipReason
from animevq.data.names import shown

log = logging.getLogger(__name__)

_HASH_BYTES = 8  # 64-bit hashes: collisions are irrelevant for a split


class Discovery(NamedTuple):
    """What :func:`find_images` found under ``root``."""

    root: Path  # data_dir as given (made absolute)
    files: list[str]  # usable image paths relative to root, POSIX style, sorted
    skipped: list[tuple[str, SkipReason]]  # (relative path, reason) for refused links


class Split(NamedTuple):
    """Positions into ``Discovery.files``; disjoint, together all files, each sorted."""

    train: list[int]
    val: list[int]


def _has_image_extension(name: str, extensions: Sequence[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def find_images(
    data_dir: str | os.PathLike[str],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    *,
    role: str = "data_dir",
) -> Discovery:
    """Every file under ``data_dir`` (recursively) whose extension, lower-cased, is in
    ``extensions``.

    Hidden entries (names starting with ".", e.g. macOS ``._x.jpg`` resource forks) are
    ignored. Symlinked directories are not followed: inside ``data_dir`` their files are
    already listed, outside it they would leave the dataset, and either way a link loop
    cannot trap the walk. Symlinked files are used when they resolve inside ``data_dir``;
    others are skipped as ``outside_data_dir`` or ``broken_link`` (dangling or looping).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        ValueError: ``data_dir`` is not a folder, or holds no image files.

    ``role`` names the folder in error messages (``animevq prepare`` says "SRC").
    """
    root = Path(data_dir).expanduser().absolute()
    wanted = ", ".join(extensions)
    if not root.exists():
        raise FileNotFoundError(
            f"{role} {shown(root)} does not exist; point {role} at a folder of images ({wanted})"
        )
    if not root.is_dir():
        raise ValueError(f"{role} {shown(root)} is a file, not a folder of images ({wanted})")
    real_root = os.path.realpath(root)
    files: list[str] = []
    skipped: list[tuple[str, SkipReason]] = []
    unfollowed_dirs: list[str] = []
    others = 0
    pending = [(str(root), "")]  # (folder, its path relative to root with a trailing /)
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            log.warning("cannot list %s (%s); its images are left out", shown(folder), error)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = prefix + entry.name
            if entry.is_symlink():
                kind = _classify_link(entry.path, real_root)
                if kind == "dir":
                    unfollowed_dirs.append(relative)
                elif not _has_image_extension(entry.name, extensions):
                    others += 1
                elif kind == "file":
                    files.append(relative)
                else:
                    skipped.append((relative, kind))
            elif entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, relative + "/"))
            elif _has_image_extension(entry.name, extensions):
                files.append(relative)
            else:
                others += 1
    if unfollowed_dirs:
        log.info(
            "not following %d symlinked folder(s) under %s (e.g. %s): files inside data_dir "
            "are listed already and links out of it are not part of the dataset",
            len(unfollowed_dirs), shown(root), ", ".join(map(shown, sorted(unfollowed_dirs)[:3])),
        )
    if not files:
        refused = f"; refused {len(skipped)} link(s)" if skipped else ""
        raise ValueError(
            f"{role} {shown(root)} holds no images: looked recursively for files ending in "
            f"{wanted} (any case) and found {others} other file(s){refused}"
        )
    files.sort()
    skipped.sort()
    return Discovery(root=root, files=files, skipped=skipped)


def _classify_link(path: str, real_root: str) -> Literal["file", "dir"] | SkipReason:
    """"file" for a link to a file inside ``real_root``, "dir" for a link to a folder,
    else the reason to skip it."""
    try:
        target = os.stat(path)  # follows the link; raises ELOOP for a loop
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            log.debug("cannot stat link %s: %s", shown(path), error)
        return SkipReason.BROKEN_LINK
    if stat.S_ISDIR(target.st_mode):
        return "dir"
    if not _is_inside(os.path.realpath(path), real_root):
        return SkipReason.OUTSIDE_DATA_DIR
    return "file"


def unit_hash(relative_path: str, seed: int) -> float:
    """A number in [0,1) fixed by (seed, path): BLAKE2b, so it is the same on every
    machine and Python run (``hash()`` is salted per process)."""
    key = f"{seed}\0{relative_path}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(key, digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "big") / 2.0 ** (8 * _HASH_BYTES)


def split_by_hash(files: Sequence[str], val_split: float, seed: int) -> Split:
    """File i goes to val iff ``unit_hash(files[i], seed) < val_split``.

    With val_split > 0 and at least two files, val and train each get at least one file:
    the file with the lowest hash moves to an empty val, the highest to an empty train.
    """
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    scores = [unit_hash(path, seed) for path in files]
    val = {i for i, score in enumerate(scores) if score < val_split}
    if val_split > 0 and len(files) >= 2:
        if not val:
            val.add(min(range(len(files)), key=scores.__getitem__))
        if len(val) == len(files):
            val.discard(max(range(len(files)), key=scores.__getitem__))
    else:
        val.clear()  # a single file has to be the training set
    train = [i for i in range(len(files)) if i not in val]
    return Split(train=train, val=sorted(val))


def sample_dir() -> Path:
    """The small folder of sample illustrations shipped inside the package; the data_dir
    used when none is given."""
    return Path(__file__).resolve().parent.parent / "sample_images"
