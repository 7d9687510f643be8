"""Memory per file: load_image refuses, from the header, a file whose decoding and conversion
to RGB would hold more than max_image_bytes at once; the conversion runs in strips, with the
same pixels as converting the whole image at once. Peaks are measured in a child process."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animevq.data import AnimeDataModule, ImageSkipped, SkipReason, load_image, to_rgb
from animevq.data import images as images_module
from animevq.data.images import DEFAULT_MAX_DECODED_BYTES
from animevq.tools.prepare import main as prepare_main
from poison import flat_png, png_chunk

MIB = 1 << 20
BIG = (16384, 8192)  # DEFAULT_MAX_PIXELS: allowed by the pixel count
SLACK_MIB = 64  # interpreter, decoder state and strips beside the counted buffers
SEMI, BLUE, CLEAR = bytes((200, 30, 60, 128)), bytes((0, 0, 255, 255)), bytes(4)

# images.py alone, loaded from its file: the child's baseline is Python, NumPy and Pillow,
# and its peak is the decode (importing animevq would first load torch and Lightning). The
# peak is VmHWM, this process image's own: ru_maxrss would start at pytest's RSS, which
# Linux carries over the fork and exec into the child's.
CHILD = r"""
import importlib.util, json, sys, warnings
warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: our limits decide

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

spec = importlib.util.spec_from_file_location("images", sys.argv[1])
images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(images)
path, target, points = sys.argv[2], int(sys.argv[3]) or None, json.loads(sys.argv[4])
result = {}
if sys.argv[5] == "estimate":  # the header's estimate, made as load_image makes it
    with images.Image.open(path) as opened:
        full = opened.size
        if target and opened.format == "JPEG":
            opened.draft(None, (target, target))
        rotated = "exif" in opened.info and opened.getexif().get(274, 1) != 1
        result["estimate_mib"] = images.decode_bytes(opened, full, rotated=rotated) / 2**20
before = peak_kib()
try:
    image = images.load_image(path, target_size=target)
    result.update(size=list(image.size), pixels=[list(image.getpixel(tuple(p))) for p in points])
except images.ImageSkipped as skip:
    result.update(reason=skip.reason.label, detail=skip.detail)
result.update(peak_mib=(peak_kib() - before) / 1024, baseline_mib=before / 1024)
print(json.dumps(result))
"""


def _measure(
    path: Path, target: int = 0, points: list[tuple[int, int]] = (), estimate: bool = False
) -> dict:
    """Load ``path`` in a fresh interpreter: what it gave, the peak RSS it added (MiB) and,
    with ``estimate``, decode_bytes' figure from the header (MiB)."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"{__file__}: the peak is read from /proc/self/status (Linux only)")
    args = [sys.executable, "-c", CHILD, images_module.__file__, str(path), str(target),
            json.dumps(points), "estimate" if estimate else "-"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def big_pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mostly flat PNGs, hundreds of KB on disk: 16384×8192 16-bit gray and RGBA, 8K×8K RGBA."""
    folder = tmp_path_factory.mktemp("big")
    width, height = BIG
    files = {name: folder / f"{name}.png" for name in ("gray16", "rgba", "rgba8k")}
    flat_png(files["gray16"], width, [(height, struct.pack(">H", 40000) * width)], depth=16,
             color_type=0)
    flat_png(files["rgba"], width, [(height, SEMI * width)], depth=8, color_type=6)
    side = 8192  # the top half: a blue quarter, then semi-transparent red; the bottom clear
    top = (side // 2, BLUE * (side // 4) + SEMI * (3 * side // 4))
    flat_png(files["rgba8k"], side, [top, (side // 2, CLEAR * side)], depth=8, color_type=6)
    return files


@pytest.mark.parametrize("name,mode_bytes", [("gray16", 2), ("rgba", 4)])
def test_a_big_png_is_refused_before_it_takes_gigabytes(
    big_pngs: dict[str, Path], name: str, mode_bytes: int
) -> None:
    """was: 4.0 GB (16-bit) and 3.4 GB (RGBA) of RSS for one file of 16384×8192."""
    result = _measure(big_pngs[name])
    assert result["peak_mib"] < DEFAULT_MAX_DECODED_BYTES / MIB + SLACK_MIB, result
    need = BIG[0] * BIG[1] * (mode_bytes + 4) // MIB  # decoded pixels + the RGB result
    assert result.get("reason") == "too_large", result
    assert f"needs {need} MiB" in result["detail"]
    assert f"max_image_bytes={DEFAULT_MAX_DECODED_BYTES}" in result["detail"]


def test_an_8k_rgba_illustration_loads_in_one_rgb_copy(big_pngs: dict[str, Path]) -> None:
    """was: 1.3 GB of RSS (whole-image RGBA copy, white background and composite)."""
    points = [(0, 0), (2047, 4095), (2048, 0), (8191, 4095), (0, 4096), (8191, 8191)]
    result = _measure(big_pngs["rgba8k"], points=points)
    assert result["size"] == [8192, 8192], result
    white = Image.new("RGBA", (1, 1), (255,) * 4)
    semi = Image.alpha_composite(white, Image.new("RGBA", (1, 1), tuple(SEMI))).convert("RGB")
    expected = [[0, 0, 255]] * 2 + [list(semi.getpixel((0, 0)))] * 2 + [[255, 255, 255]] * 2
    assert result["pixels"] == expected
    assert result["peak_mib"] < DEFAULT_MAX_DECODED_BYTES / MIB + SLACK_MIB, result


def _write(kind: str, path: Path) -> int:
    """A 2048×3072 image of the kind named; returns the target_size to load it at."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3072 // 16, 2048 // 16, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise).resize((2048, 3072), Image.Resampling.BICUBIC)
    if kind == "progressive.jpg":  # drafted to 1/8: libjpeg's coefficients dominate
        rgb.save(path, quality=90, progressive=True)
        return 256
    if kind == "rotated.jpg":  # EXIF orientation 6: the rotated copy
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.save(path, exif=exif.tobytes())
    elif kind == "rgba.webp":  # libwebp's own buffers
        rgb.convert("RGBA").save(path, quality=80, method=0)
    elif kind == "palette.png":  # P with transparency: composited in strips
        rgb.convert("P").save(path, transparency=3, compress_level=1)
    elif kind == "gray16.png":
        gray = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(path, compress_level=1)
    else:
        rgb.convert("LA").save(path, compress_level=1)
    return 0


@pytest.mark.parametrize(
    "kind", ["progressive.jpg", "rotated.jpg", "rgba.webp", "palette.png", "gray16.png", "la.png"]
)
def test_the_header_estimate_is_the_measured_peak(tmp_path: Path, kind: str) -> None:
    """The bound is only as good as decode_bytes: within a few MiB of the measured peak for
    each decoder's own buffers, the rotated copy and each conversion path."""
    path = tmp_path / kind
    result = _measure(path, _write(kind, path), estimate=True)
    assert "size" in result, result
    assert abs(result["peak_mib"] - result["estimate_mib"]) < 12, result


def _whole_image(image: Image.Image) -> Image.Image:
    """The conversion as it was, on all pixels at once (the reference for the strips)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        full_scale = max(65535.0, float(values.max(initial=0.0)))
    gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _small_images(tmp_path: Path) -> dict[str, Image.Image]:
    size = (13, 29)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    palette = Image.fromarray(pixels[..., :3]).quantize(64)
    palette.save(tmp_path / "trns.png", transparency=bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    pa = palette.convert("PA")
    pa.putalpha(Image.fromarray(pixels[..., 3]))
    gray = rng.integers(0, 65536, size[::-1])
    return {
        "RGBA": Image.fromarray(pixels), "LA": Image.fromarray(pixels[..., :2]), "PA": pa,
        "P index": _with(palette.copy(), transparency=5), "P tRNS": Image.open(tmp_path / "trns.png"),
        "L": _with(Image.fromarray(pixels[..., 0]), transparency=7),
        "I;16": Image.fromarray(gray.astype(np.uint16)),
        "I;16B": Image.fromarray(gray.astype(">u2")),
        "I": Image.fromarray(rng.integers(-5000, 200000, size[::-1], dtype=np.int32)),
        "F unit": Image.fromarray(rng.random(size[::-1], dtype=np.float32)),
        "F 8-bit": Image.fromarray((rng.random(size[::-1]) * 300 - 20).astype(np.float32)),
    }


def _with(image: Image.Image, **info: object) -> Image.Image:
    image.info.update(info)
    return image


@pytest.mark.parametrize("strip_pixels", [40, 5])  # 3 rows a strip with a short last one; 1 row
def test_strips_give_the_whole_image_pixels(tmp_path: Path, strip_pixels: int) -> None:
    for name, image in _small_images(tmp_path).items():
        ours = np.asarray(to_rgb(image, strip_pixels=strip_pixels))
        reference = np.asarray(_whole_image(image))
        assert ours.shape == (29, 13, 3) and np.array_equal(ours, reference), name
        assert len(np.unique(ours)) > 2, name  # not trivially flat


def test_the_limit_is_checked_from_the_header_and_after_decoding(tmp_path: Path) -> None:
    # A rotation that only the end of a PNG declares (eXIf after the pixels) is checked
    # after decoding, before the rotated copy is made.
    Image.new("RGB", (64, 32), (10, 20, 30)).save(tmp_path / "rgb.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    data = (tmp_path / "rgb.png").read_bytes()
    iend = data.rindex(b"IEND") - 4
    rotated = tmp_path / "rotated.png"
    rotated.write_bytes(data[:iend] + png_chunk(b"eXIf", exif.tobytes()[6:]) + data[iend:])
    decoded = 64 * 32 * 4  # RGB is 4 bytes a pixel in Pillow
    with pytest.raises(ImageSkipped) as skipped:
        load_image(rotated, max_bytes=decoded)
    assert skipped.value.reason is SkipReason.TOO_LARGE
    assert f"max_image_bytes={decoded}" in skipped.value.detail
    assert load_image(rotated, max_bytes=2 * decoded).size == (32, 64)
    assert load_image(tmp_path / "rgb.png", max_bytes=decoded).size == (64, 32)


def test_max_image_bytes_is_settable_in_the_data_module_and_prepare(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(src / "rgb.png")  # 4 KiB decoded
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(src / "rgba.png")  # 8 KiB with its RGB
    limit = 32 * 32 * 4
    dm = AnimeDataModule(str(src), val_split=0.0, image_size=16, num_workers=0,
                         max_image_bytes=limit)
    dm.setup()
    [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    assert dm.skipped == {"too_large": 1}
    args = ["prepare", str(src), str(tmp_path / "dst"), "--size", "16", "--workers", "1",
            "--no_progress", "--max_image_bytes", str(limit)]
    assert prepare_main(args) == 0
    manifest = json.loads((tmp_path / "dst" / "animevq.json").read_text())
    assert [(item["path"], item["reason"]) for item in manifest["skipped"]] == [("rgba.png", "too_large")]
    assert manifest["options"]["max_image_bytes"] == limit
