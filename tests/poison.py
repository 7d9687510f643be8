"""Bad and unusual image files, written for the data and CLI tests."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

S = 16
RED, BLUE = (255, 0, 0), (0, 0, 255)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def forged_bomb(path: Path) -> None:
    """A 60-byte PNG whose header claims 50000×50000 RGB (7.5 GB decoded)."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b""))


def flat_png(path: Path, width: int, bands: list[tuple[int, bytes]], *, depth: int,
             color_type: int) -> None:
    """A valid PNG of horizontal bands, each (rows, the samples of one row), written row by
    row: a 16384×8192 image in under a second, never whole in memory. ``depth`` and
    ``color_type`` as in the PNG header (0 gray, 2 RGB, 6 RGBA)."""
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(b"\0" + row) for rows, row in bands for _ in range(rows)]
    parts.append(compressor.flush())  # b"\0": each row's filter type, none
    height = sum(rows for rows, _ in bands)
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(parts))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b""))


def write_good(folder: Path) -> None:
    """Unusual files that must load (see test_unusual_files_decode_correctly)."""
    Image.new("CMYK", (S, S), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    gray16 = np.full((S, S), 32768, dtype=np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    palette = Image.new("P", (S, S), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(1, (S // 2, 0, S, S))  # left half index 0 (transparent), right half red
    palette.save(folder / "palette.png", transparency=0)
    Image.new("LA", (S, S), (0, 0)).save(folder / "clear_la.png")  # fully transparent black
    sideways = Image.new("RGB", (2 * S, S), BLUE)
    sideways.paste(RED, (0, 0, S, S))  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": red ends up on top
    sideways.save(folder / "exif6.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (2000, 8), (0, 255, 0)).save(folder / "strip.png")
    frames = [Image.new("RGB", (S, S), RED), Image.new("RGB", (S, S), BLUE)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("L", (20, 30), 200).save(folder / "gray.webp")
    Image.new("RGB", (24, 24), (10, 200, 30)).save(folder / "plain.bmp")


BAD_FILES = {  # file name → reason it must be skipped for
    "truncated.jpg": "truncated",
    "empty.png": "empty",
    "text.png": "not_an_image",
    "tiny.png": "too_small",
    "bomb.png": "too_large",
    "loop.png": "broken_link",
    "outside.png": "outside_data_dir",
}


def write_bad(folder: Path, elsewhere: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("<html>404 Not Found</html>")
    Image.new("RGB", (1, 1), RED).save(folder / "tiny.png")
    forged_bomb(folder / "bomb.png")
    os.symlink("loop.png", folder / "loop.png")  # points at itself
    elsewhere.mkdir(exist_ok=True)
    Image.new("RGB", (S, S), RED).save(elsewhere / "secret.png")
    os.symlink(elsewhere / "secret.png", folder / "outside.png")
    os.symlink(folder, folder / "sub_loop")  # a folder link back up: must not hang the walk
    os.symlink("cmyk.jpg", folder / "alias.jpg")  # a link inside data_dir is fine


NOT_UTF8 = os.fsdecode(b"bad\xff.png")  # 'bad\udcff.png': a Linux name that does not encode as UTF-8


def write_badly_named(root: Path, names: tuple[str, ...], *, good: int) -> Path:
    """``good`` small PNGs in ``root`` and, under each of ``names``, a file that is not an image
    (skips the test on macOS, whose file systems refuse names that are not UTF-8)."""
    import sys

    import pytest

    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        Image.new("RGB", (S, S), (40 * i, 0, 0)).save(root / f"ok{i}.png")
    for name in names:
        (root / name).write_text("not an image")
    return root
