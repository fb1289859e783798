"""The winning model back in users' hands: load a trial's adapted model, adapt it to
labelled examples and predict new ones.

>>> model = autometa.load_model("sinusoid-seed0")            # the best trial on meta-val
>>> adapted = model.adapt(support_x, support_y)                # (n, *input_shape), labels
>>> adapted.predict(x).values                                  # (m, output_size)
>>> autometa.load_model("pets").predict(images).labels         # a target task: its train split

A trial's model is rebuilt the way the leaderboard rebuilds it (the study's stored
settings, the same input files, the trial's seed) and its saved state is read from the
artifact store with ``weights_only=True``. Prediction goes through the algorithm's own
``adapt_and_predict`` on one episode (the support given, the inputs as its query set), in
eval mode, without gradients kept and with a fixed seed: the numbers are those meta-test
evaluation computes on the same episode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from autometa.config import DEFAULT_STORAGE
from autometa.errors import ConfigError, DataError
from autometa.model_inputs import read_inputs, read_support
from autometa.numeric_inputs import label_name
from autometa.precision import autocast
from autometa.study.stored import open_stored
from autometa.study.trials import TEST_ATTR, TrialPlan, ranked, ranked_trials
from autometa.task import Episodes, Task
from autometa.trial import restore

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from autometa.algorithm import MetaAlgorithm
    from autometa.plugins import PluginHost

#: The torch seed every prediction runs under (algorithms that draw random numbers while
#: adapting, e.g. a new head's initialisation, give the same predictions on every call).
PREDICT_SEED = 0


@dataclass(frozen=True)
class Predictions:
    """An adapted model's predictions for ``n`` inputs.

    Attributes:
        kind: ``"classification"`` or ``"regression"``.
        classes: classification: the class names (or labels) in column order; else None.
        labels: classification: the predicted class of each input (from ``classes``).
        probabilities: classification: (n, classes) float32, the softmax of the model's
            outputs; each row sums to 1.
        values: regression: (n, output_size) float32, in the target's units (a CSV task's
            standardisation undone).
    """

    kind: str
    classes: list[Any] | None = None
    labels: list[Any] | None = None
    probabilities: Tensor | None = None
    values: Tensor | None = None

    def __len__(self) -> int:
        shown = self.probabilities if self.kind == "classification" else self.values
        assert shown is not None
        return len(shown)

    def to_frame(self) -> pd.DataFrame:
        """One row per input: ``label`` and ``p_<class>`` columns (classification), or
        ``prediction`` (``prediction_<i>`` for several target dimensions)."""
        if self.kind == "classification":
            assert self.probabilities is not None and self.classes is not None
            probs = self.probabilities.cpu().double().numpy()
            frame = pd.DataFrame({"label": self.labels})
            for j, name in enumerate(self.classes):
                frame[f"p_{name}"] = probs[:, j]
            return frame
        assert self.values is not None
        values = self.values.cpu().double().numpy()
        if values.shape[1] == 1:
            return pd.DataFrame({"prediction": values[:, 0]})
        return pd.DataFrame({f"prediction_{i}": values[:, i] for i in range(values.shape[1])})


class Predictor:
    """A trial's meta-trained model, ready to adapt and predict.

    Built by :func:`load_model` (from a stored study) or :meth:`from_trial` (from a study
    and a task already at hand, as the leaderboard has them).

    Attributes:
        algorithm: the meta-algorithm's name (``"maml"``).
        source: the source model's name (``"mlp"``).
        params: the trial's hyperparameters as ``{"<plugin>.<name>": value}``, the names
            ``--param`` takes.
        plan: the same as a :class:`~autometa.study.trials.TrialPlan`.
        trial: the trial's number in its study; ``rank`` its meta-val rank (None if unknown).
        study: the study's name.
        task_kind: ``"classification"`` or ``"regression"``.
        class_names: a target task's class names in label order (label ``c`` is
            ``class_names[c]``), or None (a few-shot task: the support set names its classes).
        val_score, test_score: the trial's meta-val score and its cached meta-test mean
            (None if the leaderboard has not scored it).
        meta_algorithm: the :class:`~autometa.algorithm.MetaAlgorithm` with its state loaded.
        task: the task it was meta-trained on; ``device`` where its tensors live.
    """

    def __init__(self, meta_algorithm: MetaAlgorithm, task: Task, plan: TrialPlan, *,
                 study: str, trial: int, rank: int | None = None,
                 val_score: float | None = None, test_score: float | None = None) -> None:
        self.meta_algorithm, self.task, self.plan = meta_algorithm, task, plan
        self.algorithm, self.source = plan.algorithm, plan.source
        self.params = {**{f"{plan.algorithm}.{k}": v for k, v in plan.algorithm_params.items()},
                       **{f"{plan.source}.{k}": v for k, v in plan.source_params.items()}}
        self.study, self.trial, self.rank = study, trial, rank
        self.val_score, self.test_score = val_score, test_score
        self.task_kind: str = task.kind
        self.device = task.device
        self.is_target = len(task.meta_test()) == 1  # a train/val/test split: one episode
        names = getattr(task, "class_names", None)
        self.class_names: list[str] | None = (
            [str(n) for n in names] if self.is_target and task.kind == "classification"
            and names and len(names) == task.output_size else None)
        self._train: Adapted | None = None

    @classmethod
    def from_trial(cls, study: optuna.Study, trial: FrozenTrial | int, task: Task,
                   host: PluginHost, *, artifacts: str, root: Path | None = None,
                   rank: int | None = None) -> Predictor:
        """Rebuild ``trial`` of ``study`` on ``task`` (built from the study's settings) and
        load its state from the artifact store at ``artifacts``.

        Args:
            trial: a completed trial, or its number.
            root: where relative input paths among the plugins' settings resolve (None:
                the working directory), as for :func:`autometa.trial.build`.

        Raises:
            ConfigError: no such completed trial, or its state is not in the store.
            DataError: the stored state is damaged.
        """
        from optuna.trial import TrialState

        if isinstance(trial, int):
            found = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
            if not found:
                raise ConfigError(f"study {study.study_name!r} has no trial {trial}")
            trial = found[0]
        if not ranked(trial):
            state = "pruned" if trial.state == TrialState.COMPLETE else \
                trial.state.name.lower()
            raise ConfigError(f"trial {trial.number} of study {study.study_name!r} is "
                              f"{state}, not complete: it has no model; "
                              "pick a completed trial (see `autometa leaderboard`)")
        plan = TrialPlan.of(trial)
        algorithm = restore(study, trial, task, host, artifacts=artifacts, root=root)
        algorithm.model.eval()
        # Scored by its worker (a trial user attribute) or later by a leaderboard (cached).
        test = trial.user_attrs.get("test_mean", study.user_attrs.get(TEST_ATTR, {})
                                    .get(str(trial.number), {}).get("mean"))
        return cls(algorithm, task, plan, study=study.study_name, trial=trial.number,
                   rank=rank, val_score=trial.value,
                   test_score=None if test is None or math.isnan(test) else float(test))

    # -- adapting ---------------------------------------------------------------------------
    def adapt(self, support_x: Any, support_y: Any = None) -> Adapted:
        """The model adapted to labelled examples (adaptation runs in :meth:`Adapted.predict`).

        Args:
            support_x: (n, *input_shape) features encoded as the task's own examples,
                anything ``torch.as_tensor`` takes (for an input shape ``(1,)``, (n,) is
                read as n examples); or the path of a labelled file or folder, read and
                encoded by the task (:meth:`~autometa.task.Task.read_inputs`, as
                ``autometa predict --support`` reads it), ``support_y`` then omitted.
            support_y: n labels. Classification: class names or integers. For a target
                task they are its classes (:attr:`class_names`, compared as text; integer
                labels ``0..C-1`` where it has none), every class at least once. For a
                few-shot task any distinct values, exactly as many as the model's ways,
                mapped to labels ``0..N-1`` in sorted order. Regression: (n, output_size)
                or (n,) float targets, in the target's units.

        Raises:
            DataError: a shape that does not match the task's, non-finite values, labels
                that are not the task's classes or not as many as the model's ways.
        """
        if isinstance(support_x, str | os.PathLike):
            if support_y is not None:
                raise ConfigError("adapt: give support_y only with support_x as numbers; a "
                                  "support file holds its own labels")
            support_x, support_y = read_support(self.task, Path(support_x))
        elif support_y is None:
            raise ConfigError("adapt: support_y is missing: give one label per support "
                              "example (or support_x as the path of a labelled file)")
        x = self._features(support_x, "support_x")
        if self.task_kind == "classification":
            y, classes = self._labels(support_y, len(x))
        else:
            y, classes = self._targets(support_y, len(x)), None
        return Adapted(self, x, y, classes)

    def predict(self, x: Any) -> Predictions:
        """Predictions for ``x`` (n, *input_shape) after adapting on the task's train split:
        the support set meta-test evaluation adapts on (a target task only; cached).

        Raises:
            ConfigError: a few-shot task (its classes come with a support set: use
                :meth:`adapt`).
            DataError: see :meth:`Adapted.predict`.
        """
        if not self.is_target:
            raise ConfigError(
                f"the task of study {self.study!r} gives few-shot episodes, so the model "
                f"has no support set of its own: adapt it to labelled examples first, "
                f"model.adapt(support_x, support_y).predict(x) (CLI: --support PATH)")
        if self._train is None:
            episode = self.task.meta_test()[:1]
            classes: list[Any] = self.class_names or list(range(self.task.output_size))
            self._train = Adapted(self, episode.support_x[0], episode.support_y[0],
                                  classes if self.task_kind == "classification" else None)
        return self._train.predict(x)

    # -- input checks -----------------------------------------------------------------------
    def _features(self, data: Any, what: str) -> Tensor:
        """``data`` as float32 (n, *input_shape) on the device (a path: the file's inputs,
        read and encoded by the task); DataError otherwise."""
        shape = tuple(self.task.input_shape)
        if isinstance(data, str | os.PathLike):
            data, _, _ = read_inputs(self.task, Path(data))
        try:
            x = torch.as_tensor(data, dtype=torch.float32, device=self.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{what}: cannot be read as numbers ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:100]}); give an array of shape "
                            f"(n, {', '.join(map(str, shape))})") from None
        if shape == (1,) and x.ndim == 1:
            x = x[:, None]
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or len(x) == 0:
            raise DataError(f"{what}: shape {tuple(x.shape)} does not match the task's "
                            f"examples: expected (n, {', '.join(map(str, shape))}) with n >= 1 "
                            f"(input shape {shape}); give one row per example in that shape")
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        if bool(bad.any()):
            raise DataError(f"{what}: {int(bad.sum())} example(s) hold NaN or infinite values "
                            f"(first: example {int(bad.nonzero()[0])}); remove or fix them")
        return x

    def _labels(self, data: Any, n: int) -> tuple[Tensor, list[Any]]:
        values = data.tolist() if hasattr(data, "tolist") else list(data)
        if len(values) != n or any(isinstance(v, list) for v in values):
            raise DataError(f"support_y: expected {n} labels (one per support example, a flat "
                            f"list), got {len(values)}{' nested' if n == len(values) else ''}")
        ways = self.task.output_size
        if self.is_target:
            classes: list[Any] = self.class_names or list(range(ways))
            lookup = {label_name(c): i for i, c in enumerate(classes)}
            unknown = [v for v in values if label_name(v) not in lookup]
            if unknown:
                raise DataError(f"support_y: label {unknown[0]!r} is not one of the task's "
                                f"classes {classes}; use those names")
            codes = [lookup[label_name(v)] for v in values]
            if len(set(codes)) != ways:
                absent = [c for i, c in enumerate(classes) if i not in set(codes)]
                raise DataError(f"support_y: no support example of class(es) {absent}; give "
                                f"at least one example of each of the {ways} classes")
        else:
            classes = _sorted(set(values))
            if self.task.any_ways and not 2 <= len(classes) <= ways:
                raise DataError(f"support_y: {len(classes)} distinct classes, but the model "
                                f"was meta-trained on 2- to {ways}-way episodes; give "
                                f"examples of 2 to {ways} classes")
            if not self.task.any_ways and len(classes) != ways:
                raise DataError(f"support_y: {len(classes)} distinct classes, but the model "
                                f"was meta-trained on {ways}-way episodes (its head outputs "
                                f"{ways} classes); give examples of exactly {ways} classes")
            keys = {_key(c): i for i, c in enumerate(classes)}
            codes = [keys[_key(v)] for v in values]
        return torch.tensor(codes, dtype=torch.long, device=self.device), classes

    def _targets(self, data: Any, n: int) -> Tensor:
        out = self.task.output_size
        try:
            y = torch.as_tensor(data, dtype=torch.float32, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"support_y: regression targets must be numbers, shape ({n}, "
                            f"{out})") from None
        if y.ndim == 1 and out == 1:
            y = y[:, None]
        if tuple(y.shape) != (n, out):
            raise DataError(f"support_y: shape {tuple(y.shape)}, expected ({n}, {out}): one "
                            f"row of {out} target value(s) per support example")
        if not bool(torch.isfinite(y).all()):
            raise DataError("support_y: holds NaN or infinite targets; remove those examples")
        mean, std = _scaling(self.task)
        return (y - mean) / std


class Adapted:
    """A model with a support set to adapt on; :meth:`predict` adapts and predicts.

    The algorithm contract adapts and predicts in one call, so each :meth:`predict` adapts
    again, with the same result every time (fixed seed, eval mode).
    """

    def __init__(self, predictor: Predictor, support_x: Tensor, support_y: Tensor,
                 classes: list[Any] | None) -> None:
        self.predictor = predictor
        # Encoded as the task holds its data (labels 0..N-1, standardised targets).
        self.support_x, self.support_y = support_x, support_y
        self.classes = classes

    def predict(self, x: Any, *, batch_size: int | None = None) -> Predictions:
        """Adapt on the support set and predict ``x`` (m, *input_shape).

        Args:
            batch_size: inputs per episode (None: all at once). A model whose BatchNorm
                keeps no running statistics (conv4, resnet12) normalises with the batch's
                own, as at meta-test: predict batches of the task's query-set size then.

        Raises:
            DataError: ``x`` does not match the task's input shape or holds non-finite
                values, or the model's outputs are not finite.
        """
        p = self.predictor
        query = p._features(x, "x")
        step = batch_size or len(query)
        outputs = [self._run(query[i:i + step]) for i in range(0, len(query), step)]
        pred = torch.cat(outputs)  # (m, output_size)
        if not bool(torch.isfinite(pred).all()):
            raise DataError(f"the model's outputs are not finite for "
                            f"{int((~torch.isfinite(pred)).any(1).sum())} of {len(pred)} "
                            "inputs; check that the inputs are on the task's scale")
        if p.task_kind == "classification":
            assert self.classes is not None
            # An N-way support set of an any-way task: its classes are labels 0..N-1.
            pred = pred[:, :len(self.classes)]
            probabilities = torch.softmax(pred.float(), dim=-1)  # (m, classes)
            labels = [self.classes[int(i)] for i in pred.argmax(-1)]
            return Predictions("classification", classes=list(self.classes), labels=labels,
                               probabilities=probabilities)
        mean, std = _scaling(p.task)
        return Predictions("regression", values=(pred.float() * std + mean))

    def _run(self, query: Tensor) -> Tensor:
        """The algorithm's predictions for one query batch: (m, output_size)."""
        p = self.predictor
        model = p.meta_algorithm.model
        placeholder = (torch.zeros(len(query), dtype=torch.long, device=p.device)
                       if p.task_kind == "classification" else
                       torch.zeros(len(query), p.task.output_size, device=p.device))
        episode = Episodes(self.support_x[None], self.support_y[None], query[None],
                           placeholder[None])  # query labels are never read for predictions
        devices = [p.device] if p.device.type == "cuda" else []
        training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                    autocast(p.plan.precision, p.device):  # the trial's, as it was scored
                torch.manual_seed(PREDICT_SEED)
                # Inner loops that need gradients enable them themselves (torch.func.grad,
                # autometa.inner_loop, finetune's fit); nothing flows back to the state.
                return p.meta_algorithm.adapt_and_predict(episode)[0].detach()
        finally:
            model.train(training)


def _key(value: Hashable) -> Hashable:
    return (type(value).__name__, value)


def _sorted(values: set[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: a stable order all the same
        return sorted(values, key=lambda v: (type(v).__name__, repr(v)))


def _scaling(task: Task) -> tuple[float, float]:
    """(mean, std) a task standardised its regression targets with (CSV), else (0, 1)."""
    mean, std = getattr(task, "target_mean", None), getattr(task, "target_std", None)
    return (float(mean), float(std)) if mean is not None and std else (0.0, 1.0)


def pick(study: optuna.Study, rank: object) -> FrozenTrial:
    """The completed trial at meta-val ``rank`` (from 1); ConfigError if out of range."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"rank: expected a whole number from 1, got {rank!r}")
    ranked = ranked_trials(study)
    if not ranked:
        raise ConfigError(f"study {study.study_name!r} has no completed trial yet; finish a "
                          "search first (autometa run) or wait for one to complete")
    if not 1 <= rank <= len(ranked):
        n = len(ranked)
        raise ConfigError(f"the study has {n} completed trial{'s' * (n != 1)}; the rank "
                          f"must be 1..{n} (got {rank})")
    return ranked[rank - 1]


def load_model(study: str, rank: int = 1, *, storage: str | None = None,
               artifacts: str | None = None, data_root: str | None = None,
               device: str | None = None, host: PluginHost | None = None,
               cache_dir: str | None = None) -> Predictor:
    """The model of the trial ranked ``rank`` on meta-val in stored study ``study``.

    The task is rebuilt from the study's stored settings (its input files must be the ones
    the study was created with), the trial's network and algorithm from its plan and seed,
    and its state is read from the artifact store (``weights_only=True``).

    Args:
        rank: 1 for the best completed trial (the leaderboard's order).
        storage: the study's storage URL (default ``sqlite:///autometa.db``).
        artifacts: the artifact store as this machine reaches it (default: the study's).
        data_root: where relative input paths resolve (default: the working directory).
        device: the torch device to run on (default: the study's first device).
        host: the plugin host (default: the installed plugins).
        cache_dir: where an image task's decoded store is (default:
            :func:`autometa.cache.cache_dir`).

    Raises:
        ConfigError: no such study, ``rank`` out of range, an input file that differs from
            the study's, or the trial's state missing from the store.
        DataError: the stored state is damaged.
    """
    stored = open_stored(study, storage or DEFAULT_STORAGE, host=host, artifacts=artifacts,
                         data_root=data_root, device=device, cache_dir=cache_dir)
    trial = pick(stored.study, rank)  # before the task is built: a wrong rank fails at once
    task = stored.build_task()
    return Predictor.from_trial(stored.study, trial, task, stored.host,
                                artifacts=stored.config.artifacts, root=stored.root,
                                rank=rank)
