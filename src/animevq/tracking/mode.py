"""Choosing SwanLab's mode without ever reaching a login prompt.

SwanLab itself defaults to cloud mode, which hangs at an interactive login prompt on a
terminal and fails without one. animevq defaults to ``local``: everything is written under
a log directory and browsed offline with ``swanlab watch <log_dir>``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "has_cloud_credentials",
    "require_cloud_credentials",
    "resolve_mode",
    "to_swanlab_mode",
]

DEFAULT_MODE = "local"  # offline-first: no account, no network, still a full dashboard
MODES = ("local", "offline", "cloud", "disabled")
MODE_ENV_VAR = "SWANLAB_MODE"  # the variable SwanLab itself reads, so one setting serves both
API_KEY_ENV_VAR = "SWANLAB_API_KEY"
# SwanLab's CLI (`swanlab online`) and docs call cloud mode "online"; accept that spelling
# too so a SWANLAB_MODE exported for plain SwanLab keeps working here.
_ALIASES = {"online": "cloud"}
_SWANLAB_NAMES = {"local": "local", "offline": "offline", "cloud": "online", "disabled": "disabled"}


def resolve_mode(mode: str | None = None) -> str:
    """Return the tracking mode to use: explicit ``mode`` > env ``SWANLAB_MODE`` > ``"local"``.

    Args:
        mode: one of ``local`` (log dir + ``swanlab watch``), ``offline`` (log dir, upload
            later with ``swanlab sync``), ``cloud`` (swanlab.cn, needs a login) or
            ``disabled`` (nothing recorded); ``online`` is accepted as SwanLab's name for
            ``cloud``. Case and surrounding spaces are ignored; ``None`` or ``""`` defers to
            the environment.

    Returns:
        The canonical animevq mode name (one of :data:`MODES`).

    Raises:
        ValueError: for any other value, naming where it came from.
    """
    source = "mode argument"
    if mode is None or not str(mode).strip():
        mode, source = os.environ.get(MODE_ENV_VAR, ""), f"environment variable {MODE_ENV_VAR}"
        if not mode.strip():
            return DEFAULT_MODE
    name = str(mode).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in MODES:
        raise ValueError(
            f"Unknown SwanLab mode {mode!r} (from the {source}); use one of {', '.join(MODES)}. "
            f"'local' keeps everything under the log directory for `swanlab watch`."
        )
    return name


def to_swanlab_mode(mode: str) -> str:
    """Translate a canonical animevq mode into the name ``swanlab.init`` expects."""
    return _SWANLAB_NAMES[resolve_mode(mode)]


def has_cloud_credentials() -> bool:
    """Whether SwanLab could log in without asking: an API key in the environment, a saved
    ``swanlab login`` (``.netrc`` under ``SWANLAB_ROOT`` / ``~/.swanlab`` or ``./.swanlab``),
    or a client already logged in within this process. Never prompts, never touches the
    network."""
    if os.environ.get(API_KEY_ENV_VAR, "").strip():
        return True
    try:  # SwanLab's own settings loader knows every place a key may live.
        from swanlab.sdk.internal.core_python import client
        from swanlab.sdk.internal.settings import create_settings

        return client.exists() or bool(create_settings().api_key)
    except Exception:  # internal API moved: fall back to the documented file locations
        root = Path(os.environ.get("SWANLAB_ROOT") or Path.home() / ".swanlab")
        return (root / ".netrc").is_file() or (Path.cwd() / ".swanlab" / ".netrc").is_file()


def require_cloud_credentials() -> None:
    """Raise an actionable error instead of letting SwanLab prompt for a login or hang.

    Raises:
        ValueError: when no credentials are available for ``mode="cloud"``.
    """
    if not has_cloud_credentials():
        raise ValueError(
            "SwanLab mode 'cloud' needs credentials and none were found: run `swanlab login` "
            f"once, or set {API_KEY_ENV_VAR}; or choose mode='local' (the default) and browse "
            "the run with `swanlab watch <log_dir>`."
        )
