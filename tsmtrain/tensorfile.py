"""Reading files that ``torch.save`` wrote (checkpoints, a sharded head's files, a
``model.pretrained`` ``state_dict``) without ever running code from them.

Every file is read with ``torch.load(..., weights_only=True)`` (:func:`read_tensors`): tensors and
plain Python values only. PyTorch made that the default in 2.6 because a pickle can name any
function for the unpickler to call (a crafted ``__reduce__`` calling ``os.system``). For a zip
file the names its pickle would import are listed first
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and anything else is refused by name
before unpickling. Used by :mod:`tsmtrain.train.checkpoint` and :mod:`tsmtrain.models.networks`,
so it imports neither.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainingError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "read_tensors", "OLD_NUMPY_STATE", "NUMPY_VALUES", "first_line",
           "Inert"]


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (its type's name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class CheckpointError(TrainingError):
    """A checkpoint file that cannot be loaded: empty, truncated, corrupt, or not a checkpoint.

    Attributes:
        path: the file.
        reason: why, in a few words (``truncated (not a complete zip archive)``).
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class UnsafeCheckpointError(CheckpointError):
    """A file whose pickle names Python objects besides tensors and plain values (a function such
    as ``os.system`` that unpickling would call): refused before it is unpickled, never skipped.

    Attributes:
        names: the objects, as ``module.name`` (``posix.system``).
    """

    def __init__(self, path: Path, names: list[str]):
        super().__init__(path, f"refused: it holds Python objects that could run code ({', '.join(names)}); "
                               f"tsmtrain loads tensors and plain values only")
        self.names = list(names)


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array unpickling function

OLD_NUMPY_STATE = [_RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                   (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
                   type(np.dtype(np.uint32))]
"""What ``torch.load(weights_only=True)`` is allowed besides tensors and plain values, only while
it reads a checkpoint: the NumPy types of ``np.random.get_state()`` (a ``uint32`` array), which
checkpoints written before the random states became tensors hold (``numpy.core`` under NumPy 1,
``numpy._core`` under NumPy 2)."""



class Inert:
    """What an object of another project's class becomes when a file is read with ``inert=``
    names (:func:`read_tensors`): an empty shell holding the object's pickled fields as plain
    values in its ``__dict__``. None of the class's code exists or runs; no method is called on
    unpickling (the weights-only unpickler sets ``__dict__`` only on classes it was given).

    Attributes:
        name: ``module.qualname`` of the class the file named, once read (``__dict__``).
    """

    def __init__(self, *args, **kwargs):  # what a pickled call to the class passed (a Counter's dict)
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        return f"<inert {type(self).__name__}>"


def _inert_class(name: str) -> type:
    """A subclass of :class:`Inert` standing for the class ``name`` (``module.qualname``)."""
    return type(name.rsplit(".", 1)[-1], (Inert,), {"__module__": __name__})


_SCALAR = np.int64(0).__reduce__()[0]  # numpy's scalar unpickling function

NUMPY_VALUES = [_SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), (_SCALAR, "numpy._core.multiarray.scalar"),
                *{type(np.dtype(t)) for t in (np.bool_, np.int32, np.int64, np.float32, np.float64)}]
"""Also allowed with ``numpy_values=True`` (:func:`read_tensors`): NumPy scalars (an ``np.int64``
seed in mmengine's ``meta``) and the dtypes they name; values, no code."""
_NUMPY_VALUE_NAMES = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
                               | {f"numpy.dtypes.{type(np.dtype(t)).__name__}"
                                  for t in (np.bool_, np.int32, np.int64, np.float32, np.float64)})

_OLD_NUMPY_NAMES = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                              "numpy.ndarray", "numpy.dtype"})
_BLOCKED = re.compile(r"GLOBAL (\S+?)(?: was not| whose|\s|$)")


def read_tensors(path: str | Path, inert: Iterable[str] = (), numpy_values: bool = False) -> Any:
    """What ``torch.save`` wrote into ``path`` (a checkpoint, a shard, a pretrained ``state_dict``;
    the zip format or the legacy one), read onto the CPU with ``weights_only=True``: tensors and
    plain Python values only (and :data:`OLD_NUMPY_STATE`). ``inert`` names (``module.qualname``) classes
    of other projects that a file may hold besides its tensors (mmengine's ``HistoryBuffer`` in a
    training checkpoint's ``message_hub``): each is read as an :class:`Inert` shell, without its code.
    ``numpy_values`` also allows :data:`NUMPY_VALUES`.
    The file is not checked for damage
    (:func:`check_checkpoint` does that), but an empty one is refused before torch's loader, which
    aborts the interpreter on it.

    Raises:
        UnsafeCheckpointError: the file names other Python objects (``reason`` names them); it
            is refused before it is unpickled (a zip file) or as torch's unpickler meets them.
        CheckpointError: empty, unreadable, or not something ``torch.save`` wrote (one line; never
            torch's advice to load with ``weights_only=False``).
    """
    path, inert = Path(path), frozenset(inert)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(path, "empty (0 bytes)")
    except OSError as err:
        raise CheckpointError(path, f"unreadable ({err.strerror or err})") from None
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the load below says what is wrong with the file
            names = []
        allowed = _OLD_NUMPY_NAMES | inert | (_NUMPY_VALUE_NAMES if numpy_values else frozenset())
        names = [n for n in names if n not in allowed]
        if names:
            raise UnsafeCheckpointError(path, names)
    shells = [(_inert_class(name), name) for name in inert]
    try:
        with torch.serialization.safe_globals(OLD_NUMPY_STATE + shells + (NUMPY_VALUES if numpy_values else [])):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        blocked = _BLOCKED.search(text)
        if blocked:
            raise UnsafeCheckpointError(path, [blocked.group(1)]) from None
        raise CheckpointError(path, f"not a file of tensors and plain values ({_unpickler_detail(text)})") from None
    except Exception as err:  # noqa: BLE001 - unpickling raises anything
        raise CheckpointError(path, f"not a file torch.save wrote ({type(err).__name__}: {first_line(err)})") from None


def _unpickler_detail(text: str) -> str:
    """What torch's weights-only unpickler found wrong (``Unsupported operand 103``), without its
    advice to load with ``weights_only=False``."""
    text = text.split("WeightsUnpickler error:", 1)[-1]
    for line in (line.strip() for line in text.splitlines()):
        if line and "weights_only" not in line and not line.startswith(("Check the documentation", "Please file")):
            return line
    return "refused by the weights-only unpickler"


