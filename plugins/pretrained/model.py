"""Pretrained: a backbone pre-trained on the task's meta-train classes (the "Baseline").

Chen et al. (2019, "A Closer Look at Few-shot Classification") showed that plain
supervised pre-training is a strong few-shot baseline: train the features and a temporary
linear classifier over all meta-train classes (global labels, ``task.sample_labelled``),
then keep the features and put a fresh head on them for the task's episodes.

Pre-training happens in :meth:`Pretrained.prepare`, once: the features' ``state_dict`` is
cached on disk under a name hashing everything that determines it, so every later trial
and every later search with the same data and settings loads it instead (``weights_only``
loading). The key is the content, not the task's name or parameters: a sha256 of the data
pre-training sees (the labelled meta-train pool's examples and global labels) and of the
class split, from the task's ``labelled_digest()`` (:mod:`autometa.datasets` tasks have one;
for another task, a fixed sample of ``sample_labelled`` with the task's identity stands in),
plus the backbone, its parameters and the pre-training settings. So rows or classes
appended to a user's CSV file, which move classes between meta-train, meta-val and
meta-test, give another cache file: features pre-trained on what are now meta-val or
meta-test classes are never reused. A cache file that cannot be read is pre-trained again.
Pre-training is seeded by ``seed`` alone and leaves torch's global generator untouched, so
a cache hit and a miss build exactly the same network.

Once per cache file, however many processes need it: the workers of a search (and other
searches on this machine) that reach ``prepare`` together take an exclusive lock on the
cache file's ``.lock`` beside it (:func:`autometa.cache.locked`, an ``flock``). The first
pre-trains and saves; each other one logs a single warning ("pretrained conv4: another
process is pre-training it (cache file ...); waiting"), waits, and then reads what the
first wrote. The lock is held by the process, so a pre-trainer that crashes or is killed
releases it, and the next waiter finds no cache file and pre-trains itself. A cache file
already there is read without the lock (it is written by an atomic rename), so later
trials never wait nor log. The lock is the cache file's, not the study storage's: only the
processes that need this same backbone wait; workers running trials of other sources keep
claiming and running trials, and no plugin reaches into the engine. A cache directory
shared between machines over NFS keeps this (Linux emulates ``flock`` with NFS byte-range
locks, unless mounted with ``local_lock=flock`` or ``all``): one machine pre-trains, the
others wait. With a cache directory per machine, each machine pre-trains once; where the
lock is local only, machines may pre-train at once, and the rename still leaves one whole
file.

Pre-training reports its steps through :func:`autometa.work.report` ("pre-training conv4",
step, steps): a reporter that shows progress can give it an ETA; without one, a log line
at its start and end.

Cache directory: ``cache_dir``, else ``$AUTOMETA_CACHE``, else ``autometa-cache`` in the
working directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from autometa import Backbone, ConfigError, DataError, SourceModel, Task, TaskSpec, work
from autometa.cache import locked
from autometa.weights import read_state_dict, resolve_architecture

log = logging.getLogger(__name__)

#: Bumped when the recipe changes, so that older cache files are not reused.
RECIPE = 1
DEFAULT_CACHE = "autometa-cache"
#: Labelled examples hashed for a task without ``labelled_digest()``.
FALLBACK_SAMPLE = 2048


class Pretrained(SourceModel):
    input_ranks = (1, 2, 3)  # whatever the backbone accepts: checked in prepare()
    pretrained_features = True  # pre-trained on the meta-train classes: baselines run on them

    def __init__(
        self,
        *,
        backbone: str = "conv4",  # registered source model (or "module:SourceModelClass")
        backbone_params: Mapping[str, Any] | None = None,  # the backbone's hyperparameters
        steps: int = 1000,  # optimiser steps of pre-training
        batch_size: int = 64,  # labelled examples per step
        optimizer: str = "adam",  # "adam" or "sgd" (momentum 0.9)
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,  # pre-training's own seed: every trial shares its result
        cache_dir: str | None = None,  # default: $AUTOMETA_CACHE or ./autometa-cache
    ) -> None:
        source_cls = resolve_architecture(backbone)
        if not (isinstance(source_cls, type) and issubclass(source_cls, SourceModel)):
            raise ConfigError(f"pretrained.backbone: {backbone!r} is not a source model")
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"pretrained.optimizer: {optimizer!r} is not 'adam' or 'sgd'")
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"pretrained.{name}: expected a positive integer, got {value!r}")
        self.backbone = backbone
        self.backbone_params = dict(backbone_params or {})
        try:
            self.source: SourceModel = source_cls(**self.backbone_params)
        except TypeError as exc:
            raise ConfigError(f"pretrained.backbone_params {self.backbone_params} do not fit "
                              f"backbone {backbone!r}: {exc}") from exc
        self.settings = {  # everything that determines the pre-trained weights, but the task
            "recipe": RECIPE, "backbone": backbone, "backbone_params": self.backbone_params,
            "steps": steps, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
            "weight_decay": weight_decay, "seed": seed,
        }
        self.cache_dir = Path(cache_dir or os.environ.get("AUTOMETA_CACHE") or DEFAULT_CACHE)
        self._features: dict[str, Tensor] | None = None
        self._input_shape: tuple[int, ...] | None = None

    def incompatibility(self, spec: TaskSpec) -> str | None:  # type: ignore[override]
        """Why the backbone cannot serve ``spec`` (checked before anything is stored, so a
        search that names no sources leaves this one out, e.g. conv4 on a table's rows)."""
        reason = super().incompatibility(spec)
        if reason is None:
            backbone = self.source.incompatibility(spec)
            reason = f"has a backbone ({self.backbone!r}) that {backbone}" if backbone else None
        return reason

    def cache_path(self, task: Task) -> Path:
        """The cache file for ``task``'s data and class split, and these settings."""
        return self._cache_path(data_digest(task))

    def _cache_path(self, data: str) -> Path:
        key = json.dumps({"data": data, **self.settings}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.backbone)
        return self.cache_dir / f"pretrained-{name}-{digest}.pt"

    def prepare(self, task: Task) -> None:
        task_name = task.identity.get("task", type(task).__name__)
        if task.train_classes < 1:
            raise ConfigError(
                f"pretrained: task {task_name!r} has no labelled meta-train classes "
                "(train_classes = 0); supervised pre-training needs a classification task "
                "with a meta-train class split; choose another source model"
            )
        reason = self.source.incompatibility(task.spec)
        if reason:
            raise ConfigError(
                f"pretrained: backbone {self.backbone!r} cannot serve task {task_name!r}: "
                f"it {reason}"
            )
        self.source.prepare(task)
        data = data_digest(task)
        path = self._cache_path(data)
        self._features = _read_cache(path, quiet=True)  # written by a rename: no lock
        if self._features is None:
            self._features = self._pretrain_once(task, data, path)
        else:
            log.info("pretrained %s: reusing %s", self.backbone, path)
        self._input_shape = tuple(task.input_shape)

    def _pretrain_once(self, task: Task, data: str, path: Path) -> dict[str, Tensor]:
        """Pre-train and save, or wait for the process that does (see the module
        docstring) and read its cache file."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            problem = None if os.access(path.parent, os.W_OK) else "not writable"
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        if problem:
            raise ConfigError(f"pretrained: the cache directory '{path.parent}' cannot hold "
                              f"the pre-trained features ({problem}); set cache_dir (or "
                              f"$AUTOMETA_CACHE) to a writable directory")
        waiting = (f"pretrained {self.backbone}: another process is pre-training it (cache "
                   f"file {path}); waiting")
        with locked(path.with_name(f"{path.name}.lock"), waiting):
            features = _read_cache(path)  # the winner's, if this process waited
            if features is not None:
                log.info("pretrained %s: reusing %s", self.backbone, path)
                return features
            log.info("pretrained %s: pre-training on %d meta-train classes for %d steps "
                     "(cached in %s)", self.backbone, task.train_classes,
                     self.settings["steps"], path)
            features = pretrain(self.source, task, what=f"pre-training {self.backbone}",
                                **_recipe(self.settings))
            _save(features, path, {"data": data, "task": task.identity, **self.settings})
        return features

    def build(self, spec: TaskSpec) -> Backbone:
        if self._features is None:
            raise RuntimeError("Pretrained.build() needs prepare(task) first (the engine "
                               "calls it in every trial)")
        if tuple(spec.input_shape) != self._input_shape:
            raise ConfigError(f"pretrained: features were pre-trained on inputs of shape "
                              f"{list(self._input_shape or ())}, not {list(spec.input_shape)}")
        model = self.source.build(spec)  # its head is fresh, for the task's outputs
        try:
            model.features.load_state_dict(self._features)
        except RuntimeError as exc:  # the backbone's code changed since the cache was written
            raise DataError(
                f"cached pre-trained weights for {self.backbone!r} no longer fit it; delete "
                f"the files 'pretrained-*' in '{self.cache_dir}' to pre-train again "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        return model


def pretrain(
    source: SourceModel,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    seed: int,
    what: str = "pre-training",
) -> dict[str, Tensor]:
    """Train ``source``'s network on the meta-train classes; return its features' state (CPU).

    Each step is reported as ``work.report(what, step, steps)`` (rate-limited there).
    """
    spec = TaskSpec(task.kind, tuple(task.input_shape), task.train_classes)
    with torch.random.fork_rng(devices=[]):  # the trial's initialisation stays as seeded
        torch.manual_seed(seed)
        model = source.build(spec).to(task.device)  # head: the temporary linear classifier
    generator = torch.Generator(device=task.device).manual_seed(seed)
    params = model.parameters()
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))
    model.train()
    work.report(what, 0, steps)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            try:
                x, y = task.sample_labelled(batch_size, generator)  # (b, *input_shape), (b,)
            except NotImplementedError as exc:
                raise ConfigError(f"pretrained: {exc}; supervised pre-training needs it") from exc
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step % 50 == 0 or step == steps) and not math.isfinite(loss.item()):
                raise DataError(f"pretrained: pre-training diverged (loss {loss.item()} at "
                                f"step {step}); lower 'lr'")
            work.report(what, step, steps)
    log.info("pretrained: final pre-training loss %.4f", loss.item())
    return {k: v.detach().cpu().clone() for k, v in model.features.state_dict().items()}


def data_digest(task: Task) -> str:
    """sha256 (hex) of what pre-training on ``task`` sees, and of its class split.

    ``task.labelled_digest()`` when the task has one (every :mod:`autometa.datasets` task,
    computed once per task); else a digest of ``FALLBACK_SAMPLE`` examples drawn by
    ``sample_labelled`` from a fixed generator, with the task's identity.
    """
    own = getattr(task, "labelled_digest", None)
    if callable(own):
        return str(own())
    hasher = hashlib.sha256(json.dumps(task.identity, sort_keys=True, default=str).encode())
    hasher.update(repr((tuple(task.input_shape), task.train_classes)).encode())
    try:
        generator = torch.Generator(device=task.device).manual_seed(0)
        x, y = task.sample_labelled(FALLBACK_SAMPLE, generator)  # (n, *input_shape), (n,)
    except NotImplementedError:  # no labelled pool: prepare() refuses such a task anyway
        return hasher.hexdigest()
    for tensor in (x.to("cpu", torch.float32), y.to("cpu", torch.int64)):
        hasher.update(tensor.contiguous().numpy().data)
    return hasher.hexdigest()


def _read_cache(path: Path, quiet: bool = False) -> dict[str, Tensor] | None:
    """The cached features' state, or None if there is none or it cannot be read (a
    warning unless ``quiet``: the read under the lock says it)."""
    if not path.is_file():
        return None
    try:
        return read_state_dict(path)
    except (ConfigError, DataError) as exc:  # damaged, or removed meanwhile: train again
        if not quiet:
            log.warning("pretrained: ignoring the cache file %s (%s); pre-training again",
                        path, exc)
        return None


def _recipe(settings: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("steps", "batch_size", "optimizer", "lr", "weight_decay", "seed")
    return {k: settings[k] for k in keys}


def _save(state: dict[str, Tensor], path: Path, key: Mapping[str, Any]) -> None:
    """Write ``state`` and a readable ``.json`` of its key; atomic, safe between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a concurrent trial never reads a half-written file
    path.with_suffix(".json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
