"""Checkpoints hold only tensors and plain values: the check shared by the reliability tests."""

from __future__ import annotations

import torch


def assert_plain(tree, where: str = "checkpoint") -> None:
    """Fail, naming the path, at the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            assert_plain(value, f"{where}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            assert_plain(value, f"{where}[{i}]")
    else:
        assert tree is None or isinstance(tree, (torch.Tensor, str, int, float, bool)), f"{where}: {type(tree)}"
