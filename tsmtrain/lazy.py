"""Lazy package exports (PEP 562): a package names what it offers, and the submodules that need
torch are imported only when one of their names is first used. ``tsmtrain.data`` and
``tsmtrain.optim`` use it so that their torch-free modules (list files, label maps, the linear
scaling rule, the schedule) import on a login node without torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, lazy: dict[str, str], names: list[str]) -> tuple[Callable[[str], Any],
                                                                               Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        lazy: ``{public name: submodule}``, the submodule relative to the package (``".loader"``).
        names: the package's ``__all__``.

    Returns:
        ``(__getattr__, __dir__)``: ``__getattr__(name)`` imports the submodule of a lazy name,
        caches the value in the package and returns it; it raises ``AttributeError`` for any other
        name. ``__dir__()`` lists the package's names, lazy ones included.
    """

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later lookups do not come back here
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
