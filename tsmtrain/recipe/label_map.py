"""Label maps: the class names of a dataset, one per line, as mmaction2 ships them.

Line ``i`` (1-based) of the file names label ``i - 1`` (mmaction2's
``tools/data/kinetics/label_map_k400.txt``). The recipe names the file as ``data.classes``;
:func:`tsmtrain.recipe.load_recipe` checks it, and ``tsmtrain test`` / ``tsmtrain predict`` show
the names. Imports no torch (the recipe check runs without it).
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from ..errors import UserError

__all__ = ["ClassNamesError", "read_class_names"]


class ClassNamesError(UserError):
    """A label map (``data.classes``) cannot be read, is malformed, or does not match
    ``model.num_classes``; the message names the file (and line)."""


def read_class_names(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Read a label map: one class name per line, line ``i`` (1-based) naming label ``i - 1``, as
    mmaction2's ``tools/data/kinetics/label_map_k400.txt``. Surrounding spaces are stripped;
    blank lines at the end are ignored.

    Args:
        path: the file.
        num_classes: when given, the number of names it must hold (``model.num_classes``).

    Returns:
        The class names, in label order.

    Raises:
        ClassNamesError: the file cannot be read or is not UTF-8 text (the message names the
            byte, its offset and line); a blank line or a repeated name before the
            end (``FILE:LINE``); no name at all; or its length differs from ``num_classes``
            (the message names both numbers and the file).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClassNamesError(f"{path}: cannot read label map: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClassNamesError(f"{path}: {_not_utf8(data, exc)}") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name:
            raise ClassNamesError(f"{path}:{number}: blank line inside the label map (line i names label i-1)")
        if name in seen:
            raise ClassNamesError(f"{path}:{number}: class name {_shown(name)} repeats line {seen[name]}")
        seen[name] = number
    if not names:
        raise ClassNamesError(f"{path}: label map names no class")
    if num_classes is not None and len(names) != num_classes:
        raise ClassNamesError(f"{path} names {len(names)} classes but model.num_classes is {num_classes}")
    return names


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Why ``data`` is not UTF-8 text, in one line: the byte, its offset and its line."""
    line = data.count(b"\n", 0, exc.start) + 1
    return f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"


_REPR = reprlib.Repr()
_REPR.maxstring = 200


def _shown(name: str, limit: int = 100) -> str:
    """``repr(name)`` cut to ``limit`` characters (``...`` at the end when cut), so that a
    message about a huge line is not huge itself (as a recipe problem shows a value)."""
    text = _REPR.repr(name)
    return text if len(text) <= limit else text[:limit - 3] + "..."
