"""The ``animevq`` tools beside Lightning's fit and validate: each a module with a
``main(argv) -> int`` that reports errors through :func:`animevq.tools.common.run_tool`."""

from __future__ import annotations

import importlib

__all__ = ["LIGHTNING_COMMANDS", "TOOLS", "run_tool_command"]

LIGHTNING_COMMANDS: dict[str, str] = {  # the LightningCLI subcommands animevq keeps → what they do
    "fit": "train a tokenizer (--config YAML; every --model.*, --data.* and --trainer.* setting; "
           "--ckpt_path last resumes)",
    "validate": "validation losses and code usage of a checkpoint (--config YAML --ckpt_path CKPT)",
}

TOOLS: dict[str, tuple[str, str]] = {  # command → (module, what it does)
    "prepare": ("animevq.tools.prepare", "decode a folder of images once into a fast-loading prepared folder"),
    "evaluate": ("animevq.tools.evaluate", "PSNR, SSIM, LPIPS, rFID and code usage of a tokenizer on a folder"),
    "encode": ("animevq.tools.codes", "encode a folder of images into code grids (sharded .npy + manifest)"),
    "decode": ("animevq.tools.codes", "decode a token folder back into PNG images"),
    "reconstruct": ("animevq.tools.codes", "encode and decode images: reconstructions as PNGs"),
    "export": ("animevq.tools.export", "write a checkpoint's tokenizer as model.safetensors + config.json"),
}


def run_tool_command(argv: list[str]) -> int:
    """Run the tool ``argv[0]`` (a key of :data:`TOOLS`) with ``argv``; its exit status."""
    return importlib.import_module(TOOLS[argv[0]][0]).main(argv)
