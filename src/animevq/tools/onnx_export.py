"""``animevq export --onnx``: the tokenizer's two directions as ONNX graphs beside the export.

``encoder.onnx`` maps ``images`` (B,3,S,S) float32 in [-1,1] to ``codes`` (B,h·w) int64 by the
same nearest-code rule as :meth:`animevq.nn.Tokenizer.encode`; ``decoder.onnx`` maps ``codes``
(B,h·w) int64 in [0,K) back to ``images`` (B,3,S,S) float32, as :meth:`Tokenizer.decode`. The
batch size B is dynamic, the side S is fixed at export time (``--image_size``), h = w = S/f.
A graph reads no values back to check them: a code ≥ K fails in the runtime's Gather, and
a negative code counts from the end of the codebook there (torch's decode refuses both).

Both graphs come from PyTorch's ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``), which needs ``onnx`` and ``onnxscript``: ``pip install "animevq[onnx]"``.
They are imported only here, so a plain ``animevq export`` never needs them. Run the graphs
with any ONNX runtime (``onnxruntime``, ``onnxruntime-gpu``, ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..nn.tokenizer import Tokenizer, write_whole

__all__ = ["DECODER_NAME", "ENCODER_NAME", "OPSET", "OnnxExportFailed", "OnnxFiles", "export_onnx", "require_onnx"]

ENCODER_NAME = "encoder.onnx"
DECODER_NAME = "decoder.onnx"
OPSET = 20  # pinned, so a torch upgrade does not change the graphs; onnxruntime ≥ 1.17 runs it
_EXAMPLE_BATCH = 2  # the traced batch: 0 and 1 would be specialised into the graph, 2 is not
_NEEDS = ("onnx", "onnxscript")  # what torch.onnx's exporter imports


class OnnxExportFailed(Exception):
    """torch.onnx could not trace or convert a graph: a bug (here or in torch), not a user's
    mistake, so the command line keeps its traceback (it is no RuntimeError on purpose)."""


class OnnxFiles(NamedTuple):
    """What :func:`export_onnx` wrote."""

    encoder: Path  # images (B,3,S,S) → codes (B,h·w)
    decoder: Path  # codes (B,h·w) → images (B,3,S,S)


class _Encode(nn.Module):
    """Tokenizer.encode as a module's forward (what torch.export traces)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)  # (B,3,S,S) → (B,h·w)


class _Decode(nn.Module):
    """Tokenizer.decode as a module's forward."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(codes)  # (B,h·w) → (B,3,S,S)


def require_onnx() -> None:
    """Raise a one-line ValueError unless the exporter's dependencies import."""
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--onnx needs {' and '.join(_NEEDS)} (not installed: {', '.join(missing)}); "
                         'pip install "animevq[onnx]"')


def _graph(module: nn.Module, example: torch.Tensor, name: str, output: str, *, file: str) -> bytes:
    """The serialised ONNX model of ``module`` (for ``file``) with input ``name`` of dynamic batch size."""
    import onnx

    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=[name], output_names=[output], dynamic_shapes={name: {0: batch}})
    except torch.onnx.OnnxExporterError as error:
        raise OnnxExportFailed(f"torch {torch.__version__} could not export {file}") from error
    onnx.checker.check_model(program.model_proto)  # a malformed graph fails here, not in a user's runtime
    return program.model_proto.SerializeToString()


def export_onnx(tokenizer: Tokenizer, directory: str | Path, *, image_size: int) -> OnnxFiles:
    """Write ``directory/encoder.onnx`` and ``directory/decoder.onnx`` for (image_size,
    image_size) images, each through a temporary file beside it (whole or absent).

    Raises:
        ValueError: the exporter's packages are missing, or ``image_size`` does not fit the model.
        OSError: a file could not be written (naming it).
    """
    require_onnx()
    side = tokenizer.grid_size(image_size)
    tokenizer = tokenizer.to("cpu").eval()
    images = torch.zeros(_EXAMPLE_BATCH, tokenizer.config.in_channels, image_size, image_size)  # (B,3,S,S)
    codes = torch.zeros(_EXAMPLE_BATCH, side * side, dtype=torch.long)  # (B,h·w)
    encoder = _graph(_Encode(tokenizer), images, "images", "codes", file=ENCODER_NAME)
    decoder = _graph(_Decode(tokenizer), codes, "codes", "images", file=DECODER_NAME)
    out = Path(directory)
    files = OnnxFiles(out / ENCODER_NAME, out / DECODER_NAME)
    write_whole(files.encoder, encoder)
    write_whole(files.decoder, decoder)
    return files
