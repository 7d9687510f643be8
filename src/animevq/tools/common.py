"""The shared plumbing of the ``animevq`` tools (encode, decode, reconstruct, evaluate, export,
prepare): reading image folders in batches, devices, precision, progress bars, output folders,
and :func:`run_tool`, the one way a tool reports an error."""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..nn.tokenizer import write_whole
from ..runs.checkpoint_io import os_error
from ..data import (
    IMAGE_EXTENSIONS,
    ImageSkipped,
    SkipReason,
    crop_resize,
    default_num_workers,
    find_images,
    load_image,
)

log = logging.getLogger(__name__)

IMAGE_SIZE = 256  # the tools' default resolution: the seed's
BATCH_SIZE = 64  # images per batch of encode, decode and reconstruct


class ImageFiles(Dataset):
    """Files under ``root`` as uint8 (3,S,S) tensors (resize short side + centre crop).

    Item i is ``(image, status)``: status 0 for a good file, else the ``SkipReason`` code
    of a file that cannot be decoded (its image is zeros). Unlike the training dataset,
    nothing is substituted: row i is always file i.
    """

    def __init__(self, root: Path, files: Sequence[str], image_size: int) -> None:
        self.root, self.files, self.image_size = root, list(files), image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = crop_resize(load_image(self.root / self.files[i], target_size=self.image_size), self.image_size)
        except ImageSkipped as skip:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), int(skip.reason)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous(), 0  # (3,S,S)


class Batch(NamedTuple):
    """One batch of a file list: the good images and where they came from."""

    images: torch.Tensor  # (b,3,S,S) float32 in [-1,1] on the device, good files only
    positions: list[int]  # index into the file list of each row of ``images``
    skipped: list[tuple[int, str]]  # (index, reason label) of files that could not be decoded


def _batch_indices(start: int, stop: int, batch_size: int, boundary: int) -> list[list[int]]:
    """Batches of file indices in [start, stop) that never straddle a multiple of ``boundary``."""
    batches = []
    for first in range(start, stop, boundary):
        last = min(first + boundary, stop)
        batches += [list(range(b, min(b + batch_size, last))) for b in range(first, last, batch_size)]
    return batches


def image_batches(root: Path, files: Sequence[str], *, image_size: int, batch_size: int, num_workers: int,
                  device: str | torch.device, start: int = 0, boundary: int | None = None) -> Iterator[Batch]:
    """Batches of ``files[start:]`` in order, none straddling a multiple of ``boundary``
    (a shard); decoding runs in ``num_workers`` processes that live for the whole pass."""
    device = torch.device(device)
    batches = _batch_indices(start, len(files), batch_size, boundary or max(1, len(files)))
    loader = DataLoader(ImageFiles(root, files, image_size), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for indices, (pixels, status) in zip(batches, loader):
        ok = (status == 0).tolist()
        bad = [(index, SkipReason(code).label) for index, code in zip(indices, status.tolist()) if code]
        # The pinned uint8 batch crosses whole and becomes float on the device: 4× less
        # traffic than float32 and no CPU work in this (the only feeding) process.
        pixels = pixels.to(device, non_blocking=True)
        if bad:
            pixels = pixels[torch.tensor(ok, device=device)]
        images = pixels.float().div_(127.5).sub_(1.0)  # (b,3,S,S) in [-1,1]
        yield Batch(images, [index for index, good in zip(indices, ok) if good], bad)


def list_inputs(path: str | Path) -> tuple[Path, list[str]]:
    """(root, files relative to root) for one image file or a folder searched recursively."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return path.parent.absolute(), [path.name]
    found = find_images(path)  # clear errors for a missing or empty folder
    return found.root, found.files


def prepare_out_dir(path: str | Path) -> Path:
    """Create ``path`` and prove it is writable before any work is done."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"cannot write to --out {out} ({reason}); choose a writable folder") from error
    return out


def output_names(files: Sequence[str]) -> list[str]:
    """PNG names mirroring the sources: ``a/b.jpg`` → ``a/b.png``; when two sources would
    collide (``b.jpg`` and ``b.webp``), each keeps its extension: ``a/b.jpg.png``."""
    stems = [str(Path(f).with_suffix("")) for f in files]
    taken = Counter(stems)
    return [f"{stem}.png" if taken[stem] == 1 else f"{f}.png" for stem, f in zip(stems, files)]


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 image (H,W) or (H,W,C) as a PNG, whole or not at all: an interrupted run
    never leaves a truncated file, nor replaces one that was there with one."""
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="PNG")
    write_whole(path, encoded.getvalue())


def save_pngs(images: torch.Tensor, paths: Sequence[Path]) -> list[Path]:
    """Write images (B,3,H,W) in [-1,1] as 8-bit PNGs (each with :func:`save_png`)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for array, path in zip(pixels, paths):  # (H,W,3) each
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(array, path)
    return list(paths)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16-mixed on a GPU that has it, else full float32. With the compiled
    encoder bf16 runs ~2.5× faster than eager on an H100; codes are chosen by float32
    distances either way, so bf16 moves only near-ties."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16-mixed" if bf16 else "32"
    return precision


def autocast(device: str | torch.device, precision: str) -> Any:
    """The autocast context for ``precision`` ("32", "bf16-mixed", "16-mixed")."""
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtypes.get(precision, torch.float32), enabled=precision in dtypes)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def error_message(error: BaseException) -> str:
    """What the command line prints for an error, with a hint where one helps."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return f"{str(error).splitlines()[0]} (lower --batch_size)"
    return str(error)


# What a user can cause and fix (a bad path, a full disk, an unusable file or setting): one
# line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)


# Errors of writing, and what to do about each. A full disk reports no file (the write that
# failed was to an open file): the message names the output folder then.
_ANYWHERE = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some space or choose "
             "another --out", errno.EFBIG: "choose another --out", errno.EROFS: "choose a writable --out"}
_IN_OUT = {errno.ENAMETOOLONG: "choose a shorter --out, or give the inputs shorter names",
           errno.EACCES: "choose a writable --out", errno.EPERM: "choose a writable --out"}


def write_failure(error: BaseException, out: str | Path | None) -> str | None:
    """``cannot write PATH: reason; what to do`` when ``error`` is a failed write into ``out``
    (also one hidden behind another exception, as torch.save's zip writer raises it), else None."""
    cause = os_error(error)
    if cause is None:
        return None
    where = cause.filename
    # Under --out, or beside it with a suffix (prepare builds DST.tmp first).
    inside = out is not None and where is not None and str(Path(os.fsdecode(where)).absolute()).startswith(
        str(Path(out).expanduser().absolute()))
    hint = _ANYWHERE.get(cause.errno) or (_IN_OUT.get(cause.errno) if inside else None)
    if hint is None:
        return None
    return f"cannot write {os.fsdecode(where) if where is not None else out}: {cause.strerror or cause}; {hint}"


def run_tool(command: str, work: Callable[[], str | None], *, out: str | Path | None = None,
             interrupted: str | None = None) -> int:
    """Run ``animevq <command>``'s work: its summary on stdout and status 0, or a user error as
    ``animevq <command>: error: …`` on stderr and status 1 (130 for Ctrl-C when ``interrupted``
    says what to do then). A failed write names the file, or the output folder ``out``."""
    try:
        summary = work()
    except USER_ERRORS as error:
        message = write_failure(error, out) or error_message(error)
        print(f"animevq {command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"animevq {command}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    if summary:
        print(summary)
    return 0


def image_size_for(tokenizer: Any, given: int | None) -> int:
    """``--image_size`` when given, else the size ``tokenizer`` was trained at (a checkpoint's data
    module, an export's config), else :data:`IMAGE_SIZE`."""
    if given is not None:
        return given
    trained = getattr(tokenizer, "training_image_size", None)
    if trained is None:
        log.info("--image_size not given and the checkpoint does not record its training size: using %d", IMAGE_SIZE)
    return trained or IMAGE_SIZE


def add_common_arguments(parser: argparse.ArgumentParser, *, image_size: bool = True, workers: bool = True) -> None:
    if image_size:
        parser.add_argument("--image_size", type=int, default=None,
                            help=f"images are resized and centre-cropped to this; default: the size the checkpoint "
                            f"was trained at, else {IMAGE_SIZE}")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16-mixed", "16-mixed"),
                        help="auto: bf16-mixed on GPUs that support it, else 32")
    if workers:
        parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                            help="image decoding processes (default: CPUs - 1, at most 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
