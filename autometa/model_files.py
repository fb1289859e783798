"""Files out of a loaded model: predictions as a CSV (``autometa predict``) and the model
itself (``autometa export``: its state and how to rebuild it).

Every problem is one :class:`~autometa.DataError` or :class:`~autometa.ConfigError` line;
nothing is written before every input has been read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autometa.config import check_writable_dir
from autometa.errors import ConfigError
from autometa.model_inputs import read_inputs, read_support, reads_its_own_inputs
from autometa.predictor import Predictor
from autometa.version import __version__


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
        column = "target" if model.task_kind == "regression" else "label"
        raise ConfigError(f"study {model.study!r} gives few-shot episodes: the model adapts "
                          f"to labelled examples; give them with --support PATH (a CSV with "
                          f"the {column!r} column, or a folder of class folders)")
    if support is None and not reads_its_own_inputs(model.task):
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
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name, e.g. "
                          "predictions.csv")
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--out")


def check_out_dir(directory: Path, force: bool) -> None:
    """ConfigError unless ``directory`` is new, empty (or ``force``) and writable."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--out {str(directory)!r} is a file; give a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ConfigError(f"--out {str(directory)!r} is not empty; give a new or empty "
                          "folder, or --force to overwrite the model files there")
    check_writable_dir(directory, "--out")


def export(model: Predictor, directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``directory/model.pt`` (the trial's state: tensors only, loadable with
    ``torch.load(..., weights_only=True)``) and ``directory/plan.json`` (what it is and how
    to rebuild it); the two paths.

    Raises:
        ConfigError: ``directory`` is a file, or a folder that is not empty (unless
            ``force``), or not writable.
    """
    check_out_dir(directory, force)
    task = model.task
    facts = task.describe()
    plan = {
        "study": model.study,
        "trial": model.trial,
        "rank": model.rank,
        "algorithm": {"name": model.algorithm, "params": model.plan.algorithm_params},
        "source": {"name": model.source, "params": model.plan.source_params},
        "precision": model.plan.precision,
        "task": {
            "name": task.identity.get("task"),
            "params": task.identity.get("params", {}),
            "seed": task.identity.get("seed"),
            "spec": {"kind": task.kind, "input_shape": list(task.input_shape),
                     "output_size": task.output_size, "metric": task.metric.name,
                     "direction": task.metric.direction},
            "shape": "target" if model.is_target else "few-shot",
            # which classes went to meta-train, meta-val and meta-test (tasks that say)
            **({"classes_by_split": facts["classes_by_split"]}
               if "classes_by_split" in facts else {}),
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
