"""The layout's promises (docs/architecture.md): what may import what, no import cycles
(imports inside functions count), no file over 400 lines, animevq.nn free of Lightning and
SwanLab, and each model default written once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "animevq"
MAX_LINES = 400
# Each layer and the layers it may import (docs/architecture.md). Arrows point down only.
LAYERS = {
    "nn": set(),
    "config": {"nn"},
    "data": set(),
    "tracking": set(),
    "kernels": {"nn"},  # Triton kernels that nn modules take as plug-ins (never imported by nn)
    "runs": {"nn", "data"},
    "train": {"nn", "config", "runs", "tracking", "kernels"},
    "tools": {"nn", "runs", "data", "tracking"},
    "cli": {"nn", "config", "runs", "data", "tracking", "train", "tools"},
    "command": {"tools", "cli"},  # the console script: cli (Lightning) only for fit and validate
    "__main__": {"command"},  # python -m animevq: the console script
}
# What animevq.nn may import besides itself: the standard library, torch, torchvision (LPIPS's
# VGG16 architecture), safetensors (the Tokenizer's weight files) and huggingface_hub (the
# Tokenizer is a ModelHubMixin: from_pretrained of a repo id, push_to_hub, the model card's
# front matter; it brings no training framework and opens no connection on import).
NN_THIRD_PARTY = {"torch", "torchvision", "safetensors", "huggingface_hub"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path) -> list[str]:
    """Every module ``name`` imports, at any depth of the file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def _internal_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycles() -> None:
    graph = _internal_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_layers_import_only_the_layers_below() -> None:
    wrong = []
    for module, targets in _internal_graph().items():
        layer = _layer(module)
        if layer is None:  # animevq/__init__: lazy re-exports of every layer
            continue
        for target in targets:
            other = _layer(target)
            if other not in (None, layer) and other not in LAYERS[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_nn_imports_only_torch_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | NN_THIRD_PARTY
    files = list((PACKAGE / "nn").rglob("*.py"))
    assert len(files) >= 10  # the walk sees the package, subfolders included
    for path in files:
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for target in _imports(name, path):
            top = target.split(".")[0]
            assert top in allowed or target.startswith("animevq.nn"), f"{path.relative_to(SRC)} imports {target}"


def test_importing_the_tokenizer_imports_neither_lightning_nor_swanlab() -> None:
    code = ("import sys, animevq.nn; from animevq import Tokenizer, TokenizerConfig; "
            "bad = {'lightning', 'pytorch_lightning', 'swanlab'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SRC)


def test_no_source_file_is_longer_than_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("literal", ["(128, 256, 256, 256)", "(256, 256, 256, 128)", "2e-4", "0.125"])
def test_each_model_default_is_written_once(literal: str) -> None:
    """The seed's distinctive defaults appear in one file, the config dataclasses'; every other
    place derives them (VQVAEModel's signature, SEED_DEFAULTS, the quantizer's arguments)."""
    homes = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if literal in p.read_text()]
    assert len(homes) == 1 and homes[0] in ("nn/config.py", "nn/quantizer_config.py", "config.py"), homes
