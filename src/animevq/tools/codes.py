"""Turn a folder of images into code grids and back (SPEC §7).

    animevq encode --ckpt C --data_dir D --out T        # T/codes-00000.npy … + T/manifest.json
    animevq decode --ckpt C --tokens T --out DIR        # one PNG per encoded source file
    animevq reconstruct --ckpt C --input FILE_OR_DIR --out DIR

``encode`` writes shards of ``shard_size`` source files, each an (n,h,w) int16 array
(int32 when K > 32767), and rewrites ``manifest.json`` after every shard: a rerun checks
the manifest (same model, data and settings) and each finished shard's SHA-256, then
continues after the last good shard. Files that cannot be decoded are listed under
``skipped`` and get no row. Row r of the concatenated shards is ``manifest["files"][r]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nn.tokenizer import Tokenizer
from ..runs.checkpoint_io import load_tokenizer
from .common import (
    BATCH_SIZE,
    IMAGE_SIZE,
    add_common_arguments,
    autocast,
    image_batches,
    image_size_for,
    list_inputs,
    output_names,
    prepare_out_dir,
    progress_bar,
    resolve_device,
    resolve_precision,
    run_tool,
    save_pngs,
)
from .manifest import (
    FORMAT,
    MANIFEST_NAME,
    check_manifest,
    read_manifest,
    sha256_file,
    shard_batches,
    write_json,
    write_shard,
)

__all__ = ["FORMAT", "MANIFEST_NAME", "decode_tokens", "encode_folder", "main", "reconstruct"]

log = logging.getLogger(__name__)

INT16_MAX_CODES = 32767  # int16 (half the disk and RAM of int32) for codebooks of up to this many codes
DEFAULT_SHARD_SIZE = 10_000  # 10k 16×16 grids = 5 MB per int16 shard
# Measured on one H100, 256 px, default model, bf16: the encoder runs ~1.8k img/s eager and
# ~4.8k compiled, and compiling costs ~13 s once, so it pays off from ~30k images.
COMPILE_MIN_IMAGES = 30_000
# Settings that must match for a rerun to continue an existing token folder.
_RESUME_KEYS = ("format", "model_sha256", "num_embeddings", "grid", "image_size", "dtype", "shard_size",
                "precision", "source_count", "source_sha256")


def _resumable_shards(
    out: Path, header: dict[str, Any], tokenizer: Tokenizer
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """(verified shards, their files, their skipped) of an existing manifest matching ``header``."""
    if not (out / MANIFEST_NAME).exists():
        return [], [], []
    old = read_manifest(out)
    differ = [k for k in _RESUME_KEYS if old.get(k) != header[k]]
    if differ:
        detail = ", ".join(f"{k}: {old.get(k)!r} → {header[k]!r}" for k in differ)
        raise ValueError(
            f"--out {out} already holds codes made with other settings ({detail}); "
            "choose a new --out folder, or delete this one to start over"
        )
    checked = check_manifest(out, old, downsample_factor=tokenizer.downsample_factor,
                             codebook_size=tokenizer.codebook_size, headers=False)
    shards = []
    for shard, entry in zip(checked, old["shards"]):
        if not shard.path.is_file() or sha256_file(shard.path) != shard.sha256:
            break  # keep the verified prefix; this shard and later ones are redone
        shards.append(entry)
    end = shards[-1]["offset"] + shards[-1]["count"] if shards else 0
    skipped = [s for s in old["skipped"] if isinstance(s, dict) and isinstance(s.get("shard"), int)
               and s["shard"] < len(shards)]
    return shards, old["files"][:end], skipped


def encode_folder(
    tokenizer: Tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = IMAGE_SIZE,
    batch_size: int = BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device = "cpu",
    precision: str = "32",
    num_workers: int = 0,
    model_sha256: str | None = None,
    compile_encoder: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every image under ``data_dir`` into shards under ``out_dir``; returns the manifest.

    ``compile_encoder`` runs the encoder through ``torch.compile`` (None: on a GPU when at least
    ``COMPILE_MIN_IMAGES`` images remain, where it pays for its compile time).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    side = tokenizer.grid_size(image_size)
    root, sources = list_inputs(data_dir)
    out = prepare_out_dir(out_dir)
    k = tokenizer.codebook_size
    header = {
        "format": FORMAT,
        "model_sha256": model_sha256 or tokenizer.weights_sha256(),
        "num_embeddings": k,
        "grid": [side, side],
        "image_size": image_size,
        "dtype": "int16" if k <= INT16_MAX_CODES else "int32",
        "shard_size": shard_size,
        "precision": precision,
        "source_count": len(sources),
        "source_sha256": hashlib.sha256("\n".join(sources).encode("utf-8", "surrogateescape")).hexdigest(),
    }
    shards, files, skipped = _resumable_shards(out, header, tokenizer)
    manifest = {**header, "data_dir": str(root), "files": files, "shards": shards, "skipped": skipped,
                "complete": False}
    tokenizer = tokenizer.to(device).eval()
    begin = len(shards) * shard_size  # first source file of the first unfinished shard
    if compile_encoder is None:
        compile_encoder = torch.device(device).type == "cuda" and len(sources) - begin >= COMPILE_MIN_IMAGES
    encode = _compiled_encode(tokenizer, batch_size) if compile_encoder else tokenizer.encode
    rows: list[torch.Tensor] = []  # this shard's codes, kept on the device until it is written
    done = begin
    with progress_bar(len(sources), "encode", progress, initial=min(len(sources), begin)) as bar:
        for batch in image_batches(root, sources, image_size=image_size, batch_size=batch_size,
                                   num_workers=num_workers, device=device, start=begin, boundary=shard_size):
            shard = len(shards)
            if batch.images.shape[0]:
                with autocast(device, precision):
                    rows.append(encode(batch.images).view(-1, side, side))  # (b,h,w)
                files.extend(sources[p] for p in batch.positions)
            skipped.extend({"file": sources[p], "reason": r, "shard": shard} for p, r in batch.skipped)
            done += len(batch.positions) + len(batch.skipped)
            bar.update(len(batch.positions) + len(batch.skipped))
            if done == min(len(sources), (shard + 1) * shard_size):  # the shard's last batch
                codes = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, side, side))
                offset = shards[-1]["offset"] + shards[-1]["count"] if shards else 0
                shards.append(write_shard(out, shard, codes.astype(header["dtype"]), offset, [shard * shard_size, done]))
                write_json(out / MANIFEST_NAME, manifest)
                rows = []
    manifest["complete"] = True
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _compiled_encode(tokenizer: Tokenizer, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokenizer.encode`` with a compiled encoder. Eager GroupNorm/SiLU run as separate
    float32 kernels under autocast (they, not the convolutions, dominate); fused, the 256-px
    encoder runs ~2.5× faster on an H100.
    Short batches are zero-padded to ``batch_size`` so that one compiled graph serves all."""
    encoder = torch.compile(tokenizer.encoder, dynamic=False)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:  # (b,C,H,W) → (b,h·w)
        b = x.shape[0]
        if b < batch_size:
            x = torch.cat([x, x.new_zeros(batch_size - b, *x.shape[1:])])
        indices = tokenizer.quantizer.encode(tokenizer.quant_conv(encoder(x)))  # (B,h,w)
        return indices[:b].flatten(1)

    return encode


def decode_tokens(
    tokenizer: Tokenizer,
    tokens_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    precision: str = "32",
    model_sha256: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Decode a token folder to PNGs named after the source files; returns the paths written.

    The folder is untrusted: its manifest and every shard header are checked against the model
    and the folder before the output folder is created (``animevq.tools.manifest``)."""
    manifest = read_manifest(tokens_dir)
    k = tokenizer.codebook_size
    shards = check_manifest(tokens_dir, manifest, downsample_factor=tokenizer.downsample_factor, codebook_size=k)
    digest = model_sha256 or tokenizer.weights_sha256()
    if manifest["model_sha256"] != digest:
        raise ValueError(
            f"tokens in {tokens_dir} were made by a model with weights sha256 {manifest['model_sha256'][:12]}…, "
            f"not this one ({digest[:12]}…); decode with the checkpoint that encoded them"
        )
    if not manifest["complete"]:
        log.warning("%s is an unfinished encode run; decoding its %d finished shard(s) only "
                    "(rerun `animevq encode` with the same --out to finish it)", tokens_dir, len(shards))
    files = manifest["files"]
    names = output_names(files)
    if len(set(names)) != len(names):
        clash = next(n for i, n in enumerate(names) if n in names[:i])
        raise ValueError(f"{Path(tokens_dir) / MANIFEST_NAME} lists two files that would both be written as {clash}")
    out = prepare_out_dir(out_dir)
    inside = out.resolve()
    paths = [out / name for name in names]
    escaping = next((p for p in paths if not p.resolve().is_relative_to(inside)), None)
    if escaping is not None:  # through a link already in --out
        raise ValueError(f"{escaping} would be written outside --out {out}; remove the link or choose another --out")
    tokenizer = tokenizer.to(device).eval()
    written: list[Path] = []
    with progress_bar(sum(s.count for s in shards), "decode", progress) as bar:
        for shard in shards:
            for start, codes in shard_batches(shard, batch_size, k):
                indices = torch.from_numpy(codes).to(device)  # (b,h,w) int64
                with autocast(device, precision):
                    images = tokenizer.decode(indices)  # (b,3,H,W)
                first = shard.offset + start
                written += save_pngs(images, paths[first : first + len(codes)])
                bar.update(len(codes))
    return written


@torch.no_grad()
def reconstruct(
    tokenizer: Tokenizer,
    inputs: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = IMAGE_SIZE,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
    precision: str = "32",
    num_workers: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Reconstruct one image or a folder into PNGs named after the sources; returns the paths."""
    tokenizer.grid_size(image_size)
    root, sources = list_inputs(inputs)
    out = prepare_out_dir(out_dir)
    names = output_names(sources)
    tokenizer = tokenizer.to(device).eval()
    written: list[Path] = []
    with progress_bar(len(sources), "reconstruct", progress) as bar:
        for batch in image_batches(root, sources, image_size=image_size, batch_size=batch_size,
                                   num_workers=num_workers, device=device):
            if batch.images.shape[0]:
                with autocast(device, precision):
                    images = tokenizer(batch.images).reconstruction
                written += save_pngs(images, [out / names[p] for p in batch.positions])
            bar.update(len(batch.positions) + len(batch.skipped))
    return written


def _parser(command: str) -> argparse.ArgumentParser:
    descriptions = {
        "encode": "Encode every image under --data_dir into code grids: sharded .npy files and manifest.json "
        "in --out. Rerunning continues after the last finished shard.",
        "decode": "Decode a token folder written by `animevq encode` into PNGs named after the source files.",
        "reconstruct": "Encode and decode one image or a folder of images; writes PNGs named after the sources.",
    }
    parser = argparse.ArgumentParser(prog=f"animevq {command}", description=descriptions[command],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or exported model folder")
    if command == "encode":
        parser.add_argument("--data_dir", required=True, help="folder of images (searched recursively)")
        parser.add_argument("--out", required=True, help="token folder to write (or continue)")
        parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="source images per shard")
        parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                            help=f"torch.compile the encoder (auto: on a GPU for >= {COMPILE_MIN_IMAGES} images)")
    elif command == "decode":
        parser.add_argument("--tokens", required=True, help="token folder written by `animevq encode`")
        parser.add_argument("--out", required=True, help="folder for the decoded PNGs")
    else:
        parser.add_argument("--input", required=True, help="an image file or a folder of images")
        parser.add_argument("--out", required=True, help="folder for the reconstructed PNGs")
    add_common_arguments(parser, image_size=command != "decode", workers=command != "decode")
    return parser


def main(argv: Sequence[str]) -> int:
    """``animevq encode|decode|reconstruct ...``; argv[0] is the command."""
    command = argv[0] if argv else ""
    if command not in ("encode", "decode", "reconstruct"):
        print(f"animevq: unknown tokenizer command {command!r}; use encode, decode or reconstruct", file=sys.stderr)
        return 2
    args = _parser(command).parse_args(list(argv[1:]))

    def work() -> str:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        tokenizer = load_tokenizer(args.ckpt)
        common = dict(batch_size=args.batch_size, device=device, precision=precision, progress=not args.quiet)
        if command == "encode":
            manifest = encode_folder(tokenizer, args.data_dir, args.out, image_size=image_size_for(tokenizer, args.image_size),
                                     shard_size=args.shard_size, num_workers=args.num_workers,
                                     compile_encoder={"auto": None, "yes": True, "no": False}[args.compile], **common)
            return (f"encoded {len(manifest['files'])} images into {len(manifest['shards'])} shard(s) in {args.out}"
                    + (f"; skipped {len(manifest['skipped'])} unreadable file(s)" if manifest["skipped"] else ""))
        if command == "decode":
            written = decode_tokens(tokenizer, args.tokens, args.out, **common)
            return f"decoded {len(written)} images into {args.out}"
        written = reconstruct(tokenizer, args.input, args.out, image_size=image_size_for(tokenizer, args.image_size),
                              num_workers=args.num_workers, **common)
        return f"reconstructed {len(written)} images into {args.out}"

    return run_tool(command, work, out=args.out)
