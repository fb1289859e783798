"""The arithmetic a trial computes in: ``"float32"`` (the default) or ``"bf16"``
(``torch.autocast`` to bfloat16).

A search fixes one precision, or searches several as a categorical hyperparameter of
each trial (Optuna's ``precision`` parameter, recorded in the trial's plan). Under
``"bf16"``, autocast runs the matrix products and convolutions of the trial's meta-training
steps, meta-val evaluations and meta-test scoring in bfloat16; the parameters, their
gradients and the optimiser's state stay float32 (autocast casts ops, not tensors), and
so do the stored state and the scores. A stored trial is scored, and predicts, under its
own precision again: :func:`autocast` is entered around the worker's meta-training, in
:func:`~autometa.trial.score_meta_test` (the worker's and the leaderboard's scoring), and
in the :class:`~autometa.predictor.Predictor` (``autometa predict``, ``export``).

torch is imported when a context is entered, never by the names' validation: the
configuration (and ``autometa --help``) stays free of it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from autometa.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Precisions a trial can run in; the first is the default (a trial stored before
#: precisions existed ran in it).
PRECISIONS = ("float32", "bf16")
DEFAULT_PRECISION = PRECISIONS[0]


def precision_choices(value: Any) -> list[str]:
    """The precisions a ``precision`` setting names, deduplicated in order: one name, a
    comma-separated text (``"float32,bf16"``, as ``--precision`` gives it) or a list.

    Raises:
        ConfigError: an unknown name, an empty list, or another type.
    """
    names = ([v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str)
             else value)
    if not isinstance(names, list | tuple) or not names:
        raise ConfigError(f"precision: expected {' or '.join(map(repr, PRECISIONS))}, or a "
                          f"list of them to search (e.g. [\"float32\", \"bf16\"]), got {value!r}")
    for name in names:
        if name not in PRECISIONS:
            raise ConfigError(f"precision: {name!r} is not one of "
                              f"{', '.join(map(repr, PRECISIONS))}; e.g. precision = \"bf16\", "
                              "or [\"float32\", \"bf16\"] to search both")
    return list(dict.fromkeys(names))


def check_supported(precisions: list[str], device: torch.device) -> None:
    """Raise :class:`ConfigError` unless every one of ``precisions`` runs on ``device``:
    bf16 needs a CUDA device that computes in it natively (``torch.cuda.is_bf16_supported``
    without emulation: compute capability 8.0 or later); a CPU's autocast supports it; on
    another kind of device, autocast must accept it without a warning."""
    if "bf16" not in precisions:
        return
    import torch

    if device.type == "cuda":
        with torch.cuda.device(device):
            supported = _cuda_bf16(torch)
        if not supported:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"precision: bf16 is not supported natively by {device} "
                              f"({name}, compute capability "
                              f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
                              f"); use precision \"float32\" on it, or a GPU of compute "
                              "capability 8.0 or later")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autocast(device.type, dtype=torch.bfloat16)
        except RuntimeError as exc:
            caught.append(warnings.WarningMessage(str(exc), RuntimeWarning, "", 0))
    if caught:
        raise ConfigError(f"precision: bf16 autocast is not supported on {device} "
                          f"({str(caught[0].message).splitlines()[0]}); use precision "
                          "\"float32\" there")


def _cuda_bf16(torch: Any) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument never counted emulation
        return bool(torch.cuda.is_bf16_supported())


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Within, ``device``'s ops run in ``precision`` (:data:`PRECISIONS`): float32 as
    written, or bf16 under ``torch.autocast(device.type, dtype=torch.bfloat16)``.

    Autocast is thread-local: work a plugin hands to its own threads runs in float32
    (:mod:`autometa.inner_loop` keeps episodes on the calling thread under autocast).
    """
    if precision == DEFAULT_PRECISION:
        yield
        return
    if precision != "bf16":
        raise ConfigError(f"precision: {precision!r} is not one of "
                          f"{', '.join(map(repr, PRECISIONS))}")
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield
