"""How file names leave the data pipeline: as text that every log sink can encode.

On Linux a file name is bytes, and Python turns the bytes that are not UTF-8 into lone
surrogates (``b"bad\\xff.png"`` becomes ``'bad\\udcff.png'``), which a strict UTF-8 encoder
refuses: SwanLab's logger thread failed on every report that named such a file. A name
with a newline or an escape sequence would also break a one-line report or the terminal.
The data pipeline keeps names as the file system gives them (they open the files) and
passes every name it reports through :func:`shown`.
"""

from __future__ import annotations

import os
import unicodedata


def shown(name: str | os.PathLike[str]) -> str:
    """``name`` as printable UTF-8 text that still identifies the file: bytes that are not
    UTF-8 and control characters are written as backslash escapes (``bad\\xff.png``,
    ``two\\nlines.png``); every other character, Japanese included, is kept."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) == "Cc" else char
        for char in text
    )
