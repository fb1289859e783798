"""Reading model weights from local files, safely.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
Unpickling runs code named in the file, so a file that needs it is refused with a message
saying so, unless the caller passes ``trust_pickle=True`` (the bool itself: any other value,
such as the string ``"False"``, is a :class:`~autometa.ConfigError`) for a file the user
trusts. Nothing is ever downloaded. Source-model plugins (checkpoint, pretrained,
torchvision) share these helpers.

What :func:`read_state_dict` checks, each failure one line naming the file: it is a regular
file (a FIFO or a directory is never opened), it loads (torch's own multi-line advice is
never passed on: the message says whether the file is corrupt, not a tensor file, or holds
pickled code), it holds a ``state_dict``, and every floating tensor is finite.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import stat
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autometa.errors import ConfigError, DataError, PluginError

__all__ = [
    "check_flag",
    "fit_problem",
    "load_weights",
    "mismatches",
    "read_state_dict",
    "resolve_architecture",
]

#: Mismatches listed in an error message; the rest are counted.
LISTED = 5


def resolve_architecture(arch: str) -> Any:
    """A registered source model's class, or the object a ``"module:attr"`` path names."""
    if ":" not in arch:
        from autometa.plugins import create_host

        return create_host().get("source", arch).load()  # unknown name: lists the known ones
    module_name, _, attr = arch.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginError(
            f"architecture {arch!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise PluginError(f"architecture {arch!r} is a {type(obj).__name__}, not a callable")
    return obj


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a real bool; else ConfigError naming the setting ``name``.

    A flag such as ``trust_pickle`` must never be truthy by accident: the string ``"False"``
    is truthy, and a truthy ``trust_pickle`` would execute the code in a pickle.
    """
    if value is True or value is False:
        return value
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def read_state_dict(
    path: str | Path, *, trust_pickle: bool = False, setting: str = "trust_pickle"
) -> dict[str, Tensor]:
    """The ``state_dict`` in a local file, read on the CPU with ``weights_only`` loading.

    Args:
        path: the file.
        trust_pickle: exactly True to allow pickled code (``weights_only=False``).
        setting: how the user sets ``trust_pickle`` (e.g. ``"checkpoint.trust_pickle"``),
            named in messages.

    Raises:
        ConfigError: the file does not exist or is not a regular file; ``trust_pickle`` is
            not a bool.
        DataError: it is empty, corrupt or not a tensor file, needs pickled code (without
            ``trust_pickle``), holds no ``state_dict``, or holds NaN or infinite values.
    """
    trusted = check_flag(setting, trust_pickle)
    file = Path(path).expanduser()
    _check_regular(file)
    if file.stat().st_size == 0:
        raise DataError(f"weights file '{file}' is empty; save the weights again with "
                        "torch.save(model.state_dict(), path)")
    try:
        with warnings.catch_warnings():  # torch's multi-line hints are not for our users
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(file, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # not a torch.save file, truncated, pickled code, ...
        raise DataError(_load_failure(file, exc, trusted, setting)) from None
    state = _state_dict_of(obj, file)
    _check_finite(state, file)
    return state


def _check_regular(file: Path) -> None:
    try:
        mode = os.stat(file).st_mode  # follows symlinks
    except OSError:  # missing, a dangling or looping symlink, no permission
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        what = ("is a symbolic link to nothing (dangling, or a loop)" if file.is_symlink()
                else "does not exist")
        raise ConfigError(f"weights file '{file}' {what}{where}; set 'path' to a local file "
                          "(nothing is downloaded)") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)"
                if stat.S_ISFIFO(mode) else "not a regular file")
        raise ConfigError(f"weights file '{file}' is {kind}; set 'path' to a regular file "
                          "saved with torch.save")


def _load_failure(file: Path, exc: Exception, trusted: bool, setting: str) -> str:
    """One line saying why ``file`` did not load; never torch's advice or its other lines."""
    text = str(exc)
    example = f" (e.g. --param {setting}=true)" if "." in setting else ""
    remedy = f"if you trust where it came from, set {setting}=true to load it anyway{example}"
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if not trusted and isinstance(exc, pickle.UnpicklingError) and found:
        return (f"weights file '{file}' holds pickled Python objects ({found.group(1)}), not only "
                "tensors; it is refused because unpickling a file can execute arbitrary "
                f"code; {remedy}")
    if not trusted and "weights only load failed" in text.lower():
        what = "not a tensor file: it holds pickled data that safe loading refuses"
    else:
        what = f"corrupt or not a torch tensor file{_detail(exc)}"
    fix = "replace it with a file saved by torch.save(model.state_dict(), path)"
    return f"weights file '{file}' is {what}; {fix}" + ("" if trusted else f", or, {remedy}")


def _detail(exc: Exception) -> str:
    """`` (Type: first sentence)`` of ``exc``, unless torch's text gives advice or none."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    first = first.split(". ")[0].rstrip(".")
    if not first or "weights" in first.lower() or len(first) > 120:
        return f" ({type(exc).__name__})"
    return f" ({type(exc).__name__}: {first})"


def _check_finite(state: Mapping[str, Tensor], file: Path) -> None:
    """DataError naming the first tensor of ``state`` holding NaN or infinite values."""
    bad: list[tuple[str, int, int]] = []  # (key, non-finite values, values)
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        # A NaN or infinity makes the sum non-finite; a finite sum proves none, with no
        # per-value mask (an overflowing sum of finite values is settled by the count).
        if not bool(torch.isfinite(tensor.sum())):
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append((key, count, tensor.numel()))
    if bad:
        key, count, total = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise DataError(
            f"weights file '{file}' holds NaN or infinite values: tensor {key!r} has {count} "
            f"of {total}{more}; the file is damaged or was saved from a diverged training "
            "run; use another file"
        )


def _state_dict_of(obj: Any, file: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping | nn.Module):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):  # a whole pickled model (trust_pickle only)
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and obj:
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if not bad:
            state = dict(obj)
            if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
                state = {k.removeprefix("module."): v for k, v in state.items()}
            return state
        found = f"a mapping whose entry {bad[0]!r} is not a tensor (keys: {_keys(obj)})"
    else:
        found = f"a {type(obj).__name__}"
    raise DataError(
        f"weights file '{file}' holds {found}; expected a state_dict (parameter names -> "
        "tensors), or a dict with one under 'model' or 'state_dict'"
    )


def mismatches(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor]
) -> list[tuple[str, str]]:
    """``(key, problem)`` for every tensor of ``given`` that does not fit ``expected``."""
    problems = []
    for key, tensor in expected.items():
        if key not in given:
            problems.append((key, f"missing {key}"))
        elif given[key].shape != tensor.shape:
            problems.append((key, f"{key} is {list(given[key].shape)} in the file, "
                                  f"{list(tensor.shape)} in the model"))
    problems += [(key, f"unexpected {key}") for key in given if key not in expected]
    return problems


def fit_problem(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    file: str | Path,
    arch: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> str | None:
    """Why ``state`` cannot be loaded into ``module`` (one line listing the first tensors
    that do not fit, and the fix), or None if it can; keys for which ``ignore`` holds are
    left out."""
    own = {k: v for k, v in module.state_dict().items() if not ignore(k)}
    given = {k: v for k, v in state.items() if not ignore(k)}
    problems = mismatches(own, given)
    if not problems:
        return None
    listed = "; ".join(text for _, text in problems[:LISTED])
    more = f" (and {len(problems) - LISTED} more)" if len(problems) > LISTED else ""
    hint = "set 'arch' and its parameters to the architecture the file was saved from"
    if all(key.startswith("head.") for key, _ in problems):
        hint = "set replace_head=True to keep the features and train a fresh head"
    return (f"weights file '{file}' does not fit architecture {arch!r}: "
            f"{len(problems)} mismatch(es): {listed}{more}; {hint}")


def load_weights(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    file: str | Path,
    arch: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy ``state`` into ``module``; keys for which ``ignore`` holds keep their values.

    Raises:
        ConfigError: one message listing the first tensors that do not fit.
    """
    problem = fit_problem(module, state, file=file, arch=arch, ignore=ignore)
    if problem:
        raise ConfigError(problem)
    given = {k: v for k, v in state.items() if not ignore(k)}
    module.load_state_dict(given, strict=False)  # the ignored keys keep their values


def _keys(obj: Mapping[Any, Any]) -> str:
    keys = [repr(k) for k in list(obj)[:LISTED]]
    return ", ".join(keys) + (", ..." if len(obj) > LISTED else "")
