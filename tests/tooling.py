"""Helpers of the tool tests: a trained tiny model, its checkpoint, and a folder of drawings."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning
import numpy as np
import torch
from conftest import tiny_model
from PIL import Image

from animevq import VQVAEModel

SIZE = 32  # images and model input: 2×2 code grids
GOOD = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]  # sorted like find_images


def trained(**overrides) -> VQVAEModel:
    """The tiny model after three training forwards: codebook and statistics differ from their init."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, SIZE, SIZE) * 2 - 1)
    return model.eval()


def save_ckpt(model: VQVAEModel, path: Path, **extra: object) -> Path:
    """What Lightning's checkpoint of ``model`` holds, as far as the tools read it."""
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
               "pytorch-lightning_version": lightning.__version__, **extra}
    torch.save(payload, path)
    return path


def write_images(folder: Path) -> Path:
    """Five drawings on white pages (two in a subfolder) and one file that is not an image."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(GOOD):
        page = np.full((SIZE, SIZE, 3), 255, np.uint8)
        page[4 + i : 20 + i, 6:22] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(page).save(folder / name)
    (folder / "broken.png").write_text("<html>not a png</html>")
    return folder


def pixels(path: Path) -> torch.Tensor:
    """An image file as (1,3,H,W) in [-1,1], read independently of animevq's loader."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))



def flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of a checkpoint's largest tensor: same length, same zip layout."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
