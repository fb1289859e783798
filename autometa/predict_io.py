"""Files in and out of a loaded model (``autometa predict`` and ``autometa export``).

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

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from autometa.errors import AutometaError, ConfigError, DataError, PluginError
from autometa.task import InputBatch, Task

if TYPE_CHECKING:
    from autometa.predictor import Predictor


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
    from autometa.plugins import describe_error

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


def _reads_its_own_inputs(task: Task) -> bool:
    """Whether ``task`` encodes new inputs itself (overrides :meth:`Task.read_inputs`)."""
    return type(task).read_inputs is not Task.read_inputs


# -- writing ---------------------------------------------------------------------------------
def predict_file(model: Predictor, inputs: Path, out: Path, support: Path | None = None
                 ) -> int:
    """Write ``model``'s predictions for ``inputs`` to the CSV ``out``: an id column
    (``file`` or ``row``), then :meth:`Predictions.to_frame`'s; the number of rows.

    Raises:
        ConfigError: no ``support`` for a few-shot task, or for a task that leaves
            reading its inputs to the default reader (:meth:`Task.read_inputs`).
        DataError: see the module docstring.
        PluginError: the task's reader failed otherwise, or returned the wrong shapes.
    """
    check_out_file(out)
    if support is None and not model.is_target:
        raise ConfigError(f"study {model.study!r} gives few-shot episodes: the model adapts "
                          "to labelled examples; give them with --support PATH (a CSV with "
                          "the label column, or a folder of class folders)")
    if support is None and not _reads_its_own_inputs(model.task):
        raise ConfigError(f"the task of study {model.study!r} may preprocess its inputs in ways "
                          "autometa predict cannot repeat; give labelled examples in the same "
                          "units with --support PATH")
    x, ids, id_name = read_inputs(model.task, inputs)
    if support is not None:
        support_x, labels = read_support(model.task, support)
        predictions = model.adapt(support_x, labels).predict(x)
    else:
        predictions = model.predict(x)
    frame = predictions.to_frame()
    frame.insert(0, id_name, ids)
    out.parent.mkdir(parents=True, exist_ok=True)  # check_out_file found it can be made
    tmp = out.with_name(f".{out.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(out)
    return len(frame)


def check_out_file(out: Path) -> None:
    """ConfigError unless ``out`` can be written as a file (checked before any work)."""
    from autometa.config import check_writable_dir

    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name, e.g. "
                          "predictions.csv")
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--out")


def check_out_dir(directory: Path, force: bool) -> None:
    """ConfigError unless ``directory`` is new, empty (or ``force``) and writable."""
    from autometa.config import check_writable_dir

    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--out {str(directory)!r} is a file; give a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ConfigError(f"--out {str(directory)!r} is not empty; give a new or empty "
                          "folder, or --force to overwrite model.pt and plan.json there")
    check_writable_dir(directory, "--out")


def export(model: Predictor, directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``directory/model.pt`` (the trial's state: tensors only, loadable with
    ``torch.load(..., weights_only=True)``) and ``directory/plan.json`` (what it is and how
    to rebuild it); the two paths.

    Raises:
        ConfigError: ``directory`` is a file, or a folder that is not empty (unless
            ``force``), or not writable.
    """
    from autometa import __version__

    check_out_dir(directory, force)
    task = model.task
    plan = {
        "study": model.study,
        "trial": model.trial,
        "rank": model.rank,
        "algorithm": {"name": model.algorithm, "params": model.plan.algorithm_params},
        "source": {"name": model.source, "params": model.plan.source_params},
        "task": {
            "name": task.identity.get("task"),
            "params": task.identity.get("params", {}),
            "seed": task.identity.get("seed"),
            "spec": {"kind": task.kind, "input_shape": list(task.input_shape),
                     "output_size": task.output_size, "metric": task.metric.name,
                     "direction": task.metric.direction},
            "shape": "target" if model.is_target else "few-shot",
        },
        "class_names": model.class_names,
        "scores": {f"val_{task.metric.name}": model.val_score,
                   f"test_{task.metric.name}": model.test_score},
        "autometa_version": __version__,
        "torch_version": torch.__version__,
    }
    directory.mkdir(parents=True, exist_ok=True)
    state_path, plan_path = directory / "model.pt", directory / "plan.json"
    tmp = directory / ".model.pt.tmp"
    torch.save(_to_cpu(model.meta_algorithm.state_dict()), tmp)
    tmp.replace(state_path)
    plan_path.write_text(json.dumps(plan, indent=2, default=_jsonable) + "\n",
                         encoding="utf-8")
    return [state_path, plan_path]


def _to_cpu(state: Any) -> Any:
    """The state with every tensor on the CPU (loadable on a machine without the GPU)."""
    if isinstance(state, Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        out = type(state)((k, _to_cpu(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):  # a module's state_dict: its layers' versions
            out._metadata = state._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(v) for v in state)
    return state


def _jsonable(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
