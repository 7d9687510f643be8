"""Typed, checked config dataclasses: the base every animevq config derives from.

Configs arrive from JSON, YAML and checkpoints, not only from code, so :class:`Checked`
checks every field against its annotation before a subclass's own checks run. Plain
dataclasses and the standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin

__all__ = ["Checked", "config_from_mapping", "plain"]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (JSON's lists standing for tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if hint is type(None):
        return "None"
    name = f"finite {hint.__name__}" if hint is float else hint.__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class Checked:
    """Base of the config dataclasses: before a subclass's own checks, every field must be of
    its annotated type (configs arrive from JSON, YAML and checkpoints, not only from code)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not _conforms(value, hints[f.name]):
                raise TypeError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r:.60}")


def plain(value: Any) -> Any:
    """A config value as JSON/YAML data: tuples become lists, dataclasses dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not plain data")


def config_from_mapping(cls: type, values: Mapping[str, Any], *, what: str) -> Any:
    """``cls(**values)`` for a config dataclass, refusing keys it does not have (naming them
    and ``what`` the values came from) and turning lists back into tuples."""
    if type(values) is cls:
        return values
    if isinstance(values, cls):  # e.g. a whole VQConfig where VQOptions is asked: its other fields would be lost
        raise TypeError(f"{what} takes a {cls.__name__} (or a mapping of its fields), not a {type(values).__name__}; "
                        f"{sorted({f.name for f in fields(values)} - {f.name for f in fields(cls)})} are set elsewhere")
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a {cls.__name__} or a mapping of its fields, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{what} has no setting {', '.join(map(repr, unknown))}; "
                         f"known settings: {', '.join(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
