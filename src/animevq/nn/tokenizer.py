"""``Tokenizer``: images ↔ code grids, a pure ``nn.Module`` built from one config.

encoder → quant_conv → quantizer → post_quant_conv → decoder; no losses, no optimiser, no
Lightning. It saves itself as ``model.safetensors`` (raw tensors, so loading can never run
code) and ``config.json`` (its :class:`~animevq.nn.config.TokenizerConfig`), and loads those
back, including the exports of animevq 0.1. It follows huggingface_hub's ``ModelHubMixin``:
``from_pretrained`` takes a local folder or a Hub repo id, ``push_to_hub`` publishes an export,
and ``save_pretrained`` writes a model card (``README.md``) beside the two files.

Shapes: images (B,C,H,W) in [-1,1]; latents (B,D,h,w) with h = H/f, w = W/f, f the
downsampling factor (16 for four stages); indices (B,h,w), or flattened (B,h·w), in [0,K).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download
from huggingface_hub.utils import EntryNotFoundError, validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .autoencoder import Decoder, Encoder
from .card import LIBRARY_NAME, TAGS, model_card
from .config import TokenizerConfig
from .quantizers import Quantizer, QuantizerOutput, build_quantizer
from .weights import CheckpointError, check_state_dict, state_sha256

__all__ = ["CONFIG_NAME", "EXPORT_FORMAT", "WEIGHTS_NAME", "Pretrained", "Tokenizer", "TokenizerOutput",
           "image_side", "read_pretrained", "resolve_pretrained", "write_whole"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"  # the model card, where the Hub looks for it
MAX_IMAGE_SIDE = 1 << 16  # a recorded training size above this is not believed
EXPORT_FORMAT = 2  # config.json "_format_version"; 0.1's exports have none (format 1)
_FORMAT_TAG = f"animevq.tokenizer/{EXPORT_FORMAT}"  # in the safetensors metadata
NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs and tmpfs


class TokenizerOutput(NamedTuple):
    """What ``Tokenizer.forward`` returns."""

    reconstruction: torch.Tensor  # (B,C,H,W) decoded from the quantised latents
    quantized: QuantizerOutput  # z_q, indices (B,h,w), the quantizer's losses and statistics

    @property
    def indices(self) -> torch.Tensor:
        """(B,h,w) int64 code indices."""
        return self.quantized.indices


class Pretrained(NamedTuple):
    """An exported folder, read and checked."""

    config: TokenizerConfig
    state: dict[str, torch.Tensor]  # on the CPU
    metadata: dict[str, Any]  # config.json as read
    version: int  # its format: 1 (animevq 0.1) or EXPORT_FORMAT
    weights_path: Path


class Tokenizer(nn.Module, ModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS)):  # a copy: the mixin appends
    """The image tokenizer: ``encode`` images to codes, ``decode`` codes to images.

    Built from a :class:`TokenizerConfig` (the seed's architecture by default). ``forward``
    is the training forward: in training mode the quantizer may update its codebook.

    ``save_pretrained`` and ``from_pretrained`` keep the mixin's signatures but not its
    bodies: its ``from_pretrained`` parses config.json before any check of ours and its
    ``save_pretrained`` writes files in place; here every file is written whole or not at all
    and config.json is read only by :func:`read_pretrained`. ``push_to_hub(repo_id)`` is the
    mixin's: it saves into a temporary folder and uploads that.
    """

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.training_image_size: int | None = None  # the side it was trained at, when known (exports record it)
        self.config = config = config if config is not None else TokenizerConfig()
        q, latent = config.quantizer, config.latent_channels
        # Built in this order, so that one seed gives the weights animevq 0.1 gave.
        self.encoder = Encoder(config.in_channels, config.encoder_channels, config.num_res_blocks, latent)
        self.decoder = Decoder(config.in_channels, config.decoder_channels, config.num_res_blocks, latent)
        project = latent != q.embedding_dim  # 1×1 convs into and out of code space only when widths differ
        self.quant_conv = nn.Conv2d(latent, q.embedding_dim, 1) if project else nn.Identity()
        self.post_quant_conv = nn.Conv2d(q.embedding_dim, latent, 1) if project else nn.Identity()
        self.quantizer: Quantizer = build_quantizer(q)

    @property
    def codebook_size(self) -> int:
        """K: every index lies in [0, K)."""
        return self.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        """Image side / code grid side."""
        return self.config.downsample_factor

    def grid_size(self, image_size: int) -> int:
        """Side h of the code grid of (S,S) images; S must be a multiple of the downsampling."""
        factor = self.downsample_factor
        if image_size <= 0 or image_size % factor:
            raise ValueError(f"image_size {image_size} must be a positive multiple of {factor} "
                             "(the encoder's downsampling)")
        return image_size // factor

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Reconstruct images (B,C,H,W) in [-1,1] through the quantizer."""
        q = self.quantizer(self.quant_conv(self.encoder(x)))
        return TokenizerOutput(self.decoder(self.post_quant_conv(q.z_q)), q)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) in [-1,1] → code indices (B,h·w) int64 in [0,K). Never updates the codebook."""
        return self.quantizer.encode(self.quant_conv(self.encoder(x))).flatten(1)  # (B,h,w) → (B,h·w)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B,h·w) (a square grid) or (B,h,w) → images (B,C,f·h,f·w) in [-1,1]."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(
                    f"flat indices of length {indices.shape[1]} are not a square grid; pass them as (B,h,w)"
                )
            indices = indices.view(indices.shape[0], side, side)  # (B,h·w) → (B,h,w)
        elif indices.dim() != 3:
            raise ValueError(f"indices must be (B,h·w) or (B,h,w), got shape {tuple(indices.shape)}")
        z_q = self.quantizer.indices_to_codes(indices.to(self.decoder.stem.weight.device))  # (B,D,h,w)
        return self.decoder(self.post_quant_conv(z_q))

    def weights_sha256(self) -> str:
        """SHA-256 of the weights (names, dtypes, shapes, bytes). It identifies the weights, not
        a file: a checkpoint and its export hash alike, so codes made with one decode with the
        other. animevq 0.1 computed the same hash."""
        return state_sha256(self.state_dict())

    # ---------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | Path, *, config: None = None,
                        model_card_kwargs: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` and the model card ``README.md`` (from
        ``model_card_kwargs``: see :func:`animevq.nn.card.model_card`) into ``save_directory``;
        returns the folder. ``config`` exists for the mixin's ``push_to_hub``, which passes
        None: config.json is always this tokenizer's own config."""
        if config is not None:
            raise ValueError("config.json holds the tokenizer's own config; build a Tokenizer from the config you want")
        out = Path(save_directory)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create export folder {out}: {error}; choose a writable folder") from error
        self._save_pretrained(out)
        card = self.generate_model_card(**(model_card_kwargs or {}))
        write_whole(out / CARD_NAME, str(card).encode())  # replaced: a card describes the weights beside it
        return out

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: the weights and the versioned config."""
        # clone: safetensors refuses tensors that share storage
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        config = {"_class_name": type(self).__name__, "_format_version": EXPORT_FORMAT, **self.config.to_dict()}
        if self.training_image_size is not None:  # the tools' default image size when they load it
            config["_image_size"] = self.training_image_size
        # Serialised here and written by Python: a failed write (a full disk) is an OSError naming
        # the file, and each file is whole or absent (safetensors' own writer raises its own error).
        weights = safetensors_bytes(state, metadata={"format": "pt", "animevq": _FORMAT_TAG})
        write_whole(save_directory / WEIGHTS_NAME, weights)
        write_whole(save_directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

    def generate_model_card(self, **facts: Any) -> ModelCard:
        """The mixin's hook: the card of these weights; ``facts`` are :func:`model_card`'s keywords."""
        return ModelCard(model_card(self.config, weights_sha256=self.weights_sha256(), **facts))

    @classmethod
    def from_pretrained(  # type: ignore[override]  # the mixin's signature plus map_location
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Tokenizer:
        """Load what :meth:`save_pretrained` (or animevq 0.1's ``export``) wrote, in eval mode.

        ``pretrained_model_name_or_path`` is a local folder (read with no network call) or a
        Hub repo id such as ``"user/anime-vq"``, whose config.json and model.safetensors
        huggingface_hub downloads into its cache (``revision``, ``cache_dir``,
        ``force_download``, ``token`` and ``local_files_only`` are its arguments; with
        ``HF_HUB_OFFLINE=1`` only the cache is read). Either way the files pass the same checks.
        """
        return cls._from_pretrained(model_id=pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token,
                                    map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str | Path, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu") -> Tokenizer:
        """The mixin's hook: find the folder, read and check it, build the tokenizer."""
        folder = resolve_pretrained(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token)
        pretrained = read_pretrained(folder)
        tokenizer = cls.from_state(pretrained.config, pretrained.state, source=str(pretrained.weights_path))
        tokenizer.training_image_size = image_side(pretrained.metadata.get("_image_size"))
        return tokenizer.to(map_location)

    @classmethod
    def from_state(cls, config: TokenizerConfig, state: dict[str, torch.Tensor], *, source: str) -> Tokenizer:
        """A tokenizer in eval mode holding ``state``. The shapes ``config`` implies are checked
        against the file's first, on a tokenizer built on the meta device: a file whose config
        asks for more than its weights hold allocates nothing before it is refused."""
        broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if broken is not None:  # NaN weights would map every image to one code, silently
            raise CheckpointError(f"{source} holds non-finite values in {broken}; use an earlier checkpoint")
        tokenizer = cls.check_state(config, state, source=source).to_empty(device="cpu")
        tokenizer.load_state_dict(state)  # strict: every tensor to_empty left unset is overwritten
        return tokenizer.eval()

    @classmethod
    def check_state(cls, config: TokenizerConfig, state: dict[str, torch.Tensor], *, source: str) -> Tokenizer:
        """Raise a CheckpointError unless ``state`` fits ``config``; returns the tokenizer built
        on the meta device for the check (no memory behind it)."""
        with torch.device("meta"):
            shapes = cls(config)
        check_state_dict(shapes, state, source=source)
        return shapes


def image_side(value: Any) -> int | None:
    """``value`` if it is a plausible image side in pixels (a file's record is untrusted), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_IMAGE_SIDE else None


def resolve_pretrained(name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
                       force_download: bool = False, local_files_only: bool = False,
                       token: str | bool | None = None) -> Path:
    """The folder holding an export: ``name_or_path`` itself when it is a folder, else the
    snapshot of the Hub repo of that id in huggingface_hub's cache (downloaded when needed and
    allowed; only config.json and model.safetensors). A ``Path`` or a string that cannot be a
    repo id is a local folder that does not exist."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    try:
        if isinstance(name_or_path, Path):
            raise ValueError("a Path is a local folder")
        validate_repo_id(name_or_path)
    except ValueError:
        raise CheckpointError(f"exported model folder {folder} does not exist; create it with `animevq export`") from None
    try:
        return Path(snapshot_download(repo_id=name_or_path, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], revision=revision,
                                      cache_dir=cache_dir, force_download=force_download,
                                      local_files_only=local_files_only, token=token))
    except (OSError, ValueError, EntryNotFoundError) as error:  # HTTP, offline, not in the cache
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{name_or_path} is not a local folder, and the Hugging Face Hub repo of that id could "
                              f"not be fetched ({reason}); check the path or the repo id and revision") from error


def read_pretrained(directory: str | Path) -> Pretrained:
    """An exported folder's config and weights, with errors that name the file at fault."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"exported model folder {folder} does not exist; create it with `animevq export`")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{folder} is not an exported model: {needed.name} is missing (see `animevq export`)")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    version = data.get("_format_version", 1)
    try:
        if version == 1:  # animevq 0.1: VQVAEModel's flat hyperparameters
            config = TokenizerConfig.from_hparams(data)
        elif version == EXPORT_FORMAT:
            config = TokenizerConfig.from_dict({k: v for k, v in data.items() if not k.startswith("_")})
        else:
            raise ValueError(f"its format {version!r} is newer than this animevq reads ({EXPORT_FORMAT}); "
                             "upgrade animevq")
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} does not describe a tokenizer: {error}") from error
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from error
    return Pretrained(config, state, data, version, weights_path)


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (whole or not at all).

    Raises:
        OSError: naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if len(os.fsencode(tmp.name)) > NAME_MAX:  # a name that fits may not fit with the temporary's dots
        tmp = path.with_name(f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:32]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
