"""Reading the published pickles (CIFAR-100's python version, Ren et al.'s tieredImageNet)
as data only.

A pickle can run any code while it loads, so these files are read by an unpickler that
builds only what the published files hold: dicts, lists, numbers, strings and bytes, and
numpy arrays and scalars. A pickle that names any other Python object (a class, a
function) is refused before it is built. Keys are read with ``encoding="bytes"`` (the files
were written by Python 2) and compared as text, so a file re-saved by Python 3, with
``str`` keys, reads the same.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autometa import DataError

#: The globals a pickle of plain numpy data refers to (numpy 1 and 2 spell the module
#: differently; ``_codecs.encode`` is how protocol 2 writes bytes).
ALLOWED = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class _Refused(Exception):
    """A pickle names a global outside :data:`ALLOWED`."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def load(path: Path, name: str, what: str) -> Any:
    """The data in pickle ``path`` (``what`` it should be, for messages).

    Raises:
        DataError: the file cannot be read, is not a pickle, or holds objects other than
            plain data (naming the file and the object).
    """
    try:
        with open(path, "rb") as handle:
            return _DataUnpickler(handle, encoding="bytes").load()
    except _Refused as exc:
        raise DataError(f"{name}: {str(path)!r} holds a Python object {exc}, not the plain "
                        f"arrays of {what}; only data are read from pickles (loading one can "
                        "run code): use the published file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OSError) as exc:
        brief = str(exc).splitlines()[0][:120] if str(exc) else "no details"
        raise DataError(f"{name}: {str(path)!r} cannot be read as {what} ({type(exc).__name__}: "
                        f"{brief}); the file is damaged or of another format: download it "
                        "again") from None


def text(value: Any) -> str:
    """A key or name as text (Python 2 pickles read with ``encoding="bytes"`` give bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def entries(data: Any, keys: Sequence[str], path: Path, name: str, what: str
            ) -> dict[str, Any]:
    """``{key: value}`` of the dict ``data`` for ``keys``, whatever the keys' type.

    Raises:
        DataError: ``data`` is not a dict, or lacks one of ``keys`` (naming the keys it has).
    """
    if not isinstance(data, dict):
        raise DataError(f"{name}: {str(path)!r} holds a {type(data).__name__}, not the dict of "
                        f"{what} (keys {', '.join(keys)}); use the published file")
    found = {text(k): v for k, v in data.items()}
    missing = [k for k in keys if k not in found]
    if missing:
        has = ", ".join(sorted(found)[:8]) or "none"
        raise DataError(f"{name}: {str(path)!r} has no key {missing[0]!r}"
                        f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                        f"{what} has keys {', '.join(keys)}; this file has {has}; use the "
                        "published file")
    return {k: found[k] for k in keys}
