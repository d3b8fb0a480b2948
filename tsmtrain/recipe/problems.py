"""Problems with a recipe, and the one error that carries them all.

:func:`~tsmtrain.recipe.loader.load_recipe` collects *every* problem (unknown key, wrong type,
missing file, impossible combination) as a :class:`Problem` before raising one
:class:`RecipeError`; each problem names the file, the key path, the line in the YAML file where
it can be found, and the offending value. The CLI prints them one per line and exits with
status 2. :func:`validation_problems` turns pydantic's ``ValidationError`` into such problems.

This module imports neither the schema nor the loader (they import it).
"""

from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import UserError

COMBINATIONS = "tsmtrain_combinations"
"""The pydantic error type of the schema's impossible combinations of fields; its context's
``rows`` hold one ``(key, value, why)`` each (read back by :func:`validation_problems`)."""

__all__ = ["Problem", "RecipeError", "validation_problems", "closest"]


_SHOWN = 100
"""Characters of a value that a :class:`Problem` shows at most."""

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * _SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 20


def _shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`_SHOWN` characters (``...`` at the end when cut), so that
    no message about a huge value is huge itself."""
    try:
        text = _REPR.repr(value)
    except Exception:  # an int too long for str(), a failing __repr__: say what it is
        text = f"<{type(value).__name__}>"
    return _cut(text)


def _cut(text: str, limit: int = _SHOWN) -> str:
    """``text`` cut to ``limit`` characters, ``...`` at the end when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


_MISSING = object()
"""The value of a :class:`Problem` that has none (a missing key, the file as a whole)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where it is and why. ``str()`` gives
    ``FILE:LINE: KEY = VALUE: why`` (no ``:LINE`` without a line, no ``KEY`` for a problem with
    the file as a whole, no ``= VALUE`` without a value; a long value is cut to 100 characters)."""

    file: str
    key: str
    value: Any
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        value = "" if self.value is _MISSING else f" = {_shown(self.value)}"
        what = f"{self.key}{value}: " if self.key else ""
        return f"{where}: {what}{self.message}"


class RecipeError(UserError):
    """Raised by :func:`~tsmtrain.recipe.loader.load_recipe` with every :class:`Problem` found
    (``problems``); ``str()`` gives one per line."""


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Why ``data`` is not UTF-8 text, in one line: the byte, its offset and its line."""
    line = data.count(b"\n", 0, exc.start) + 1
    return f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"


def validation_problems(err: ValidationError, schema: type[BaseModel], file: str, lines: dict[str, int],
                        overridden: dict[str, str]) -> list[Problem]:
    """The problems in pydantic's ``err``, one per error, as ``tsmtrain validate`` prints them.

    Args:
        err: raised by ``schema.model_validate``.
        schema: the model validated (:class:`~tsmtrain.recipe.schema.Recipe`): its keys are the
            candidates for "did you mean" on an unknown key.
        file: the recipe file, named by each problem.
        lines: the 1-based line of every dotted key path in ``file``
            (:func:`~tsmtrain.recipe.loader.line_index`).
        overridden: key paths set on the command line, each with what set it (``--set`` or a
            flag such as ``--nodes``): their problems name that, with no line.

    Returns:
        One :class:`Problem` per error (the schema's combination checks, raised as one error of
        type :data:`~tsmtrain.recipe.schema.COMBINATIONS` with ``(key, value, why)`` rows in its
        context, give one per row); pydantic's union and tuple sub-locations are dropped, and a problem
        repeated (``std: [0, 0, 0]``) is given once.
    """
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == COMBINATIONS:
            for key, value, why in e["ctx"]["rows"]:
                src = overridden.get(key, file)
                problems.append(Problem(src, key, value, why, lines.get(key) if src == file else None))
            continue
        # drop pydantic's union/tuple sub-locations for readability
        key = loc
        while key and key not in lines and "." in key and key.rsplit(".", 1)[1].isdigit():
            key = key.rsplit(".", 1)[0]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            known = _known_keys(schema, parent)
            close = closest(key.rsplit(".", 1)[-1], known)
            if close:
                msg += f" (did you mean {close!r}?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        value = _MISSING if e["type"] == "missing" else e.get("input", _MISSING)
        if isinstance(value, dict):
            value = _MISSING
        src = overridden.get(key, file)
        problem = Problem(src, key, value, msg, lines.get(key) if src == file else None)
        if problem not in problems:  # std: [0, 0, 0] is one problem, not three
            problems.append(problem)
    return problems


def _known_keys(schema: type[BaseModel], section: str) -> list[str]:
    """The keys of ``section`` (a dotted path into ``schema``; "" for the top level), [] when it is
    not a section."""
    model = schema
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate most like ``word`` (``difflib`` ratio at least 0.6), for "did you mean";
    None when none is."""
    hits = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return hits[0] if hits else None
