"""New inputs for a loaded model (``autometa predict --input/--support``,
``Predictor.adapt`` and ``predict`` given a path).

Inputs are read by the study's task, :meth:`~autometa.task.Task.read_inputs`, so that the
model sees the same numbers as it saw in the study: a task that encodes its data (the csv
task's preprocessor, the image-folder task's decoder) reads new files its own way; any
other task gets the default, a CSV of numbers given to the model as they are
(:mod:`autometa.numeric_inputs`). Such a task may have preprocessed its own data in ways
that reader cannot repeat, so for a target task a support file must come with them.

Every problem is one :class:`~autometa.DataError` or :class:`~autometa.ConfigError` line
(a task's reader that fails otherwise: one :class:`~autometa.PluginError` line); nothing is
written before every input has been read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from autometa.errors import AutometaError, DataError, PluginError
from autometa.plugins import describe_error
from autometa.task import InputBatch, Task


# -- reading ---------------------------------------------------------------------------------
def read_inputs(task: Task, path: Path) -> tuple[Tensor, list[Any], str]:
    """Unlabelled inputs at ``path``: (n, *input_shape) float32, one id per input (the
    file name, or the CSV's data row from 0) and the id column's name."""
    batch = _read(task, path, labelled=False)
    return batch.x, batch.ids, batch.id_name


def read_support(task: Task, path: Path) -> tuple[Tensor, list[Any]]:
    """Labelled support examples at ``path``: (n, *input_shape) float32 and n labels
    (class names, or regression targets as rows of floats)."""
    batch = _read(task, path, labelled=True)
    assert batch.labels is not None
    return batch.x, batch.labels


def _read(task: Task, path: Path, *, labelled: bool) -> InputBatch:
    """``task.read_inputs``, its failures other than autometa's own as one PluginError."""
    flag = "--support" if labelled else "--input"
    if not path.exists():
        raise DataError(f"{flag} {str(path)!r} does not exist; give a CSV file or images")
    name = task.identity.get("task", type(task).__name__)
    try:
        batch = task.read_inputs(path, labelled=labelled)
    except (KeyboardInterrupt, AutometaError):
        raise
    except Exception as exc:  # a plugin's reader never ends the host with a traceback
        raise PluginError(f"task {name!r} raised in read_inputs() on {flag} {str(path)!r}: "
                          f"{describe_error(exc)}") from exc
    shape = (len(batch.x), *task.input_shape)
    if tuple(batch.x.shape) != shape or len(batch.ids) != len(batch.x) or (
            labelled and (batch.labels is None or len(batch.labels) != len(batch.x))):
        raise PluginError(f"task {name!r}: read_inputs() returned inputs of shape "
                          f"{tuple(batch.x.shape)} with {len(batch.ids)} id(s) and "
                          f"{'no' if batch.labels is None else len(batch.labels)} label(s); "
                          f"expected {shape}, one id{' and label' * labelled} per input")
    return batch


def reads_its_own_inputs(task: Task) -> bool:
    """Whether ``task`` encodes new inputs itself (overrides :meth:`Task.read_inputs`)."""
    return type(task).read_inputs is not Task.read_inputs
