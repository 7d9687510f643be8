"""The ``animevq`` console script: the list of commands, the tools, and Lightning's fit/validate.

``animevq``, ``animevq --help`` and the tools start without importing Lightning's trainer
(the CLI of :mod:`animevq.cli` takes seconds to import); ``fit`` and ``validate`` go to it.
"""

from __future__ import annotations

import sys

from .tools import LIGHTNING_COMMANDS, TOOLS, run_tool_command
from . import __version__

__all__ = ["main", "overview"]

def overview() -> str:
    """What ``animevq --help`` prints: every command with one line."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *TOOLS]))
    lines = [f"usage: animevq COMMAND [options]   (animevq {__version__}; COMMAND --help for its options)", "",
             "animevq trains and uses VQ-VAE / VQ-GAN image tokenizers.", "", "training (PyTorch Lightning):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    lines += ["", "Errors are one line; add --verbose (or set ANIMEVQ_VERBOSE=1) for the traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``animevq`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        raise SystemExit(0 if args else 2)
    if args[0] == "--version":
        print(f"animevq {__version__}")
        raise SystemExit(0)
    if args[0] in TOOLS:
        raise SystemExit(run_tool_command(args))
    if args[0] not in LIGHTNING_COMMANDS and not args[0].startswith("-"):
        print(f"animevq: unknown command {args[0]!r}\n\n{overview()}", file=sys.stderr)
        raise SystemExit(2)
    from . import cli  # Lightning: only for fit and validate

    cli.main(argv)
