"""Reading model weights from local files, safely.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
Unpickling runs code named in the file, so a file that needs it is refused with a message
saying so, unless the caller passes ``trust_pickle=True`` for a file the user trusts.
Nothing is ever downloaded. Source-model plugins (checkpoint, pretrained, torchvision)
share these helpers.
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autometa.errors import ConfigError, DataError, PluginError

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


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` in a local file, read on the CPU with ``weights_only`` loading.

    Raises:
        ConfigError: the file does not exist.
        DataError: it cannot be read, needs pickled code (without ``trust_pickle``), or
            holds no ``state_dict``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"weights file '{file}' does not exist{where}; set 'path' to a local "
                          "file (nothing is downloaded)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise DataError(f"cannot read weights file '{file}': {_one_line(exc)}") from exc
        found = re.search(r"GLOBAL (\S+)", str(exc))
        needs = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"weights file '{file}' holds pickled Python objects{needs}, not only tensors; "
            "it is refused because unpickling a file can execute arbitrary code. If you trust "
            "where it came from, set trust_pickle=True to load it anyway"
        ) from None
    except Exception as exc:  # not a torch.save file, truncated, ...
        raise DataError(f"cannot read weights file '{file}': {_one_line(exc)}") from exc
    return _state_dict_of(obj, file)


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
    own = {k: v for k, v in module.state_dict().items() if not ignore(k)}
    given = {k: v for k, v in state.items() if not ignore(k)}
    problems = mismatches(own, given)
    if problems:
        listed = "; ".join(text for _, text in problems[:LISTED])
        more = f" (and {len(problems) - LISTED} more)" if len(problems) > LISTED else ""
        hint = "set 'arch' and its parameters to the architecture the file was saved from"
        if all(key.startswith("head.") for key, _ in problems):
            hint = "set replace_head=True to keep the features and train a fresh head"
        raise ConfigError(
            f"weights file '{file}' does not fit architecture {arch!r}: "
            f"{len(problems)} mismatch(es): {listed}{more}; {hint}"
        )
    module.load_state_dict(given, strict=False)  # the ignored keys keep their values


def _keys(obj: Mapping[Any, Any]) -> str:
    keys = [repr(k) for k in list(obj)[:LISTED]]
    return ", ".join(keys) + (", ..." if len(obj) > LISTED else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
