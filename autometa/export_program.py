"""A target task's adapted model as a self-contained program: ``autometa export``'s
``model.pt2`` (a :mod:`torch.export` ``ExportedProgram``), its ``model.json`` (what goes in
and what comes out) and, where the ``onnx`` package is installed, ``model.onnx``.

The program is the model meta-test scores: the trial's network after its algorithm adapted
it on the task's train split (the support set of the one meta-test episode, exactly as
meta-test adapts), with what adaptation fitted (a new head, prototypes, a probe's weights,
adapted parameters: :meth:`MetaAlgorithm.adapted_module`) baked in as buffers, and the
task's input scaling inside. Plain PyTorch runs it without autometa::

    program = torch.export.load("model.pt2").module()
    scores = program(pixels)            # (N, classes): argmax is the label

Input of an image task: the images decoded as the task decodes them (Pillow, see
:data:`DECODE_RECIPE`), uint8 (N, H, W, C), exactly what ``Image.tobytes()`` holds; the
program divides by 255 (the task's [0, 1] scaling) and runs the source's own input stage
(resizing, standardisation: :class:`autometa.images.PixelInputs`) inside its network.
Other tasks: float32 (N, *input_shape), encoded as the task encodes its examples.
Output: classification, (N, classes) scores in the label order of ``class_names``
(logits, or log-probabilities for the frozen-feature classifiers: argmax is the label,
softmax the probabilities ``autometa predict`` writes); regression, (N, outputs) in the
target's units.

A few-shot task has no support set of its own: its model adapts to the examples it is
given. Where the adaptation is tensor maths (ProtoNet's and nearest-centroid's class
means: :meth:`~autometa.algorithm.MetaAlgorithm.adaptation_modules`), the export is a
pair, ``adapt.pt2`` (support examples and labels ``0..ways-1`` -> a tuple of tensors, the
prototypes) and ``predict.pt2`` (inputs and those tensors -> scores)::

    state = adapt(support_x, support_y)
    scores = predict(x, *state)

Where it is steps in Python (fine-tuning, MAML's gradient steps, a solver), which a traced
program cannot hold, nothing is written; :func:`export_program` says so in one line and
names what to use instead (``autometa predict --support``, ``Predictor.adapt``). Likewise
for a target task's algorithm whose
:meth:`~autometa.algorithm.MetaAlgorithm.adapted_module` gives None (pmf).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autometa.errors import ConfigError
from autometa.images import RESIZE_POLICIES
from autometa.precision import autocast
from autometa.predictor import PREDICT_SEED, Predictor, _scaling

PROGRAM_FILE, MANIFEST_FILE, ONNX_FILE = "model.pt2", "model.json", "model.onnx"
#: A few-shot model's pair: a support set -> tensors; (inputs, those tensors) -> outputs.
ADAPT_FILE, PREDICT_FILE = "adapt.pt2", "predict.pt2"

#: How a plain script decodes an image as the task did (autometa.images.decode_image),
#: for each resize policy ({mode}: "L" for 1 channel, "RGB" for 3; {size}: the side).
DECODE_RECIPE = {
    "stretch": "im = Image.open(f); im.draft({mode}, ({size}, {size})); "
               "im = im.convert({mode}).resize(({size}, {size}), Image.Resampling.BILINEAR)",
    "center-crop": "im = Image.open(f); im.draft({mode}, ({size}, {size})); "
                   "im = im.convert({mode}); "
                   "w, h = im.size; m = min(w, h); l, t = (w - m) // 2, (h - m) // 2; "
                   "im = im.resize(({size}, {size}), Image.Resampling.BILINEAR, "
                   "box=(l, t, l + m, t + m))",
    "pad": "im = Image.open(f); im.draft({mode}, ({size}, {size})); im = im.convert({mode}); "
           "w, h = im.size; k = {size} / max(w, h); "
           "iw, ih = max(1, round(w * k)), max(1, round(h * k)); "
           "out = Image.new({mode}, ({size}, {size})); "
           "out.paste(im.resize((iw, ih), Image.Resampling.BILINEAR), "
           "(({size} - iw) // 2, ({size} - ih) // 2)); im = out",
}


@dataclass
class Written:
    """What :func:`export_program` wrote (paths) and what it left out, one line each."""

    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_program(model: Predictor, directory: Path) -> Written:
    """Write ``directory/model.pt2`` and ``model.json`` (and ``model.onnx`` with ``onnx``
    installed) for ``model``, adapted on its task's train split; for a few-shot task,
    ``adapt.pt2``, ``predict.pt2`` and ``model.json``.

    An algorithm that gives no adapted module (target task) or no adaptation modules
    (few-shot task) writes nothing, and the line that says why is returned. Files of an
    earlier export in ``directory`` are removed first (none is left beside a ``model.pt``
    it does not match), and each file is written under a temporary name, then renamed: no
    half-written file is left.

    Raises:
        ConfigError: ``torch.export`` cannot trace the adapted model (e.g. Python control
            flow on tensor values), in one line naming it.
    """
    out = Written()
    for stale in (PROGRAM_FILE, MANIFEST_FILE, ONNX_FILE, ADAPT_FILE, PREDICT_FILE):
        (directory / stale).unlink(missing_ok=True)  # an earlier export's (--force)
    instead = (f"use `autometa predict {model.study} --rank {model.rank or 1} --support DIR` "
               f"or autometa.load_model({model.study!r}).adapt(support_x, support_y)"
               ".predict(x)")
    if not model.is_target:
        pair = model.meta_algorithm.adaptation_modules()
        if pair is None:
            out.notes.append(
                f"{PROGRAM_FILE}: not written: study {model.study!r} gives few-shot episodes, "
                f"so its model has no support set of its own, and {model.algorithm} adapts "
                "to each support set by steps in Python (gradient steps, a solver) that a "
                f"torch.export program cannot hold; {instead}")
            return out
        out.paths += _export_pair(model, pair, directory)
        out.notes.append(f"{PROGRAM_FILE}: not written: study {model.study!r} gives few-shot "
                         f"episodes: {ADAPT_FILE} adapts to a support set, {PREDICT_FILE} "
                         f"predicts with what it gives (see {MANIFEST_FILE})")
        return out
    adapted = adapted_module(model)
    if adapted is None:
        out.notes.append(f"{PROGRAM_FILE}: not written: algorithm {model.algorithm!r} gives "
                         "no adapted module to export (MetaAlgorithm.adapted_module); "
                         f"{instead}")
        return out
    program, example, manifest = _wrap(model, adapted)
    exported = trace(program, example, f"{model.algorithm} + {model.source}")
    directory.mkdir(parents=True, exist_ok=True)
    out.paths += [_save(exported, directory / PROGRAM_FILE),
                  _save_manifest(manifest, directory / MANIFEST_FILE)]
    if manifest["batch_statistics"]:
        out.notes.append(f"{PROGRAM_FILE}: its BatchNorm uses each batch's own statistics, "
                         "so a prediction depends on the rest of its batch: feed the test "
                         "split as one batch to reproduce the leaderboard (model.json: "
                         "batch_statistics)")
    onnx = _onnx(exported, example, directory)
    if isinstance(onnx, Path):
        out.paths.append(onnx)
    else:
        out.notes.append(onnx)
    return out


def _export_pair(model: Predictor, pair: tuple[nn.Module, nn.Module], directory: Path
                 ) -> list[Path]:
    """``adapt.pt2`` and ``predict.pt2`` (:meth:`MetaAlgorithm.adaptation_modules`, any
    number of support and query examples) and ``model.json``; their paths.

    Raises:
        ConfigError: ``torch.export`` cannot trace one of them.
    """
    task, what = model.task, f"{model.algorithm} + {model.source}"
    adapt, predict = (m.to("cpu").eval().requires_grad_(False) for m in pair)
    image, example, inputs = _inputs(model)
    if image:
        adapt, predict = Pixels(adapt).eval(), Pixels(predict).eval()
    ways = task.output_size
    support_x, support_y = example(2 * ways), torch.arange(ways).repeat(2)
    n = torch.export.Dim("support", min=2)

    def shapes(first: dict[int, Any], rest: list[dict[int, Any]]) -> tuple[Any, ...]:
        # torch.export matches dynamic shapes to forward's signature: Pixels takes
        # (pixels, *rest), whose rest is one tuple argument.
        return (first, tuple(rest)) if image else (first, *rest)

    adapt_program = trace(adapt, (support_x, support_y), what, shapes({0: n}, [{0: n}]))
    with torch.no_grad():
        state = adapt_program.module()(support_x, support_y)
    state = tuple(state) if isinstance(state, tuple | list) else (state,)
    dynamic = shapes({0: torch.export.Dim.DYNAMIC}, [{} for _ in state])
    predict_program = trace(predict, (example(2), *state), what, dynamic)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [_save(adapt_program, directory / ADAPT_FILE),
             _save(predict_program, directory / PREDICT_FILE)]
    manifest = {
        **_manifest(model, inputs),
        "files": {"adapt": ADAPT_FILE, "predict": PREDICT_FILE},
        "load": f"adapt = torch.export.load({ADAPT_FILE!r}).module(); "
                f"predict = torch.export.load({PREDICT_FILE!r}).module()",
        "usage": "state = adapt(support_x, support_y); scores = predict(x, *state)",
        "support_y": f"int64 (n,): labels 0..{ways - 1}, your classes in sorted order "
                     f"(as autometa predict --support numbers them); {ways} classes at most",
        "state": [list(t.shape) for t in state],
    }
    return [*paths, _save_manifest(manifest, directory / MANIFEST_FILE)]


def _save(program: torch.export.ExportedProgram, path: Path) -> Path:
    """``program`` saved at ``path`` under a temporary name first: no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp.pt2")
    try:
        torch.export.save(program, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_manifest(manifest: dict[str, Any], path: Path) -> Path:
    """``model.json`` written under a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def adapted_module(model: Predictor) -> nn.Module | None:
    """The trial's network adapted on its target task's train split, on the CPU, in eval
    mode: the algorithm's :meth:`~autometa.algorithm.MetaAlgorithm.adapted_module`, called
    as :meth:`Predictor.predict` adapts (eval mode, no gradients kept, the fixed seed)."""
    episode = model.task.meta_test()[:1]  # the train split as support, the test split as query
    algorithm = model.meta_algorithm
    network = algorithm.model
    training = network.training
    network.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                autocast(model.plan.precision, model.device):  # adapted as it was scored
            torch.manual_seed(PREDICT_SEED)
            adapted = algorithm.adapted_module(episode.support_x[0], episode.support_y[0])
    finally:
        network.train(training)
    if adapted is None:
        return None
    adapted = adapted.to("cpu").eval()
    adapted.requires_grad_(False)
    return adapted


class Pixels(nn.Module):
    """Decoded images in, the adapted network's outputs out: uint8 (N, H, W, C) ->
    float32 (N, C, H, W) / 255 (the task's scaling) -> ``net`` (with any other inputs
    after the images, as they are)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: Tensor, *rest: Tensor) -> Any:
        # Contiguous: the task holds its images channels-first; a channels-last view could
        # send a convolution down another kernel, with other rounding.
        x = pixels.permute(0, 3, 1, 2).contiguous().float().div(255)
        return self.net(x, *rest)


class Scaled(nn.Module):
    """``net``'s regression outputs in the target's units: ``y * std + mean``."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.std + self.mean


def _inputs(model: Predictor) -> tuple[bool, Any, dict[str, Any]]:
    """Whether the task's examples are decoded images (then the programs take uint8
    pixels), a maker of example inputs (n -> (n, ...)), and ``model.json``'s input."""
    task = model.task
    shape = tuple(int(d) for d in task.input_shape)
    resize = getattr(task, "resize", None)
    if len(shape) == 3 and shape[0] in (1, 3) and resize in RESIZE_POLICIES:
        channels, size = shape[0], shape[-1]
        mode = "L" if channels == 1 else "RGB"
        return True, lambda n: torch.zeros(n, size, size, channels, dtype=torch.uint8), {
            "dtype": "uint8", "shape": ["N", size, size, channels], "layout": "NHWC",
            "range": [0, 255], "pillow_mode": mode, "size": size, "resize": resize,
            "resample": "bilinear",
            "decode": DECODE_RECIPE[str(resize)].format(mode=repr(mode), size=size),
            "to_tensor": "torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)"
                         f".view({size}, {size}, {channels})",
            "note": "16-bit grayscale (mode I;16) keeps its 8 most significant bits "
                    "(value >> 8) before convert; alpha is dropped by convert",
        }
    return False, lambda n: torch.zeros(n, *shape), {
        "dtype": "float32", "shape": ["N", *shape],
        "encoding": "as the task encodes its examples (see plan.json's task)"}


def _manifest(model: Predictor, inputs: dict[str, Any]) -> dict[str, Any]:
    task = model.task
    return {
        "format": "torch.export ExportedProgram",
        "study": model.study, "trial": model.trial, "rank": model.rank,
        "algorithm": model.algorithm, "source": model.source,
        "input": inputs,
        "output": ({"kind": "classification", "shape": ["N", task.output_size],
                    "scores": "logits or log-probabilities: argmax is the label, softmax "
                              "the probabilities"}
                   if task.kind == "classification" else
                   {"kind": "regression", "shape": ["N", task.output_size],
                    "values": "in the target's units"}),
        "class_names": model.class_names,
        # The trial's precision; the program itself computes in float32 (its scores may
        # differ from a bf16 trial's in the last digits).
        "precision": model.plan.precision,
        "scores": {f"test_{task.metric.name}": model.test_score,
                   f"val_{task.metric.name}": model.val_score},
        "torch_version": torch.__version__,
    }


def _wrap(model: Predictor, adapted: nn.Module) -> tuple[nn.Module, Tensor, dict[str, Any]]:
    """The module to trace, an example input (two examples) and ``model.json``'s text."""
    task = model.task
    net = adapted
    if task.kind == "regression":
        mean, std = _scaling(task)
        if (mean, std) != (0.0, 1.0):
            net = Scaled(net, mean, std)
    image, example, inputs = _inputs(model)
    manifest = {
        **_manifest(model, inputs),
        "file": PROGRAM_FILE,
        "load": f"torch.export.load({PROGRAM_FILE!r}).module()",
        "adapted_on": f"the task's train split ({len(task.meta_test()[:1].support_y[0])} "
                      "examples), as meta-test adapts",
        # BatchNorm without running statistics normalises every batch by its own: each
        # output depends on the rest of the batch (transductive, as meta-test scored it).
        "batch_statistics": batch_statistics(adapted),
    }
    return (Pixels(net) if image else net).eval(), example(2), manifest


def batch_statistics(net: nn.Module) -> bool:
    """Whether ``net`` normalises by each batch's own statistics in eval mode (a BatchNorm
    without running statistics, as conv4 and resnet12 meta-learn): its outputs for an
    example then depend on the other examples of its batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
               for m in net.modules())


def trace(program: nn.Module, example: Tensor | tuple[Tensor, ...], what: str,
          dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """``program`` exported; by default for any batch size (dimension 0 of its one input
    dynamic).

    Raises:
        ConfigError: ``torch.export`` refused it (one line, its first).
    """
    args = example if isinstance(example, tuple) else (example,)
    if dynamic_shapes is None:
        dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},)
    try:
        with torch.no_grad():
            return torch.export.export(program, args, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch raises many types: UserError, Unsupported, RuntimeError
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        brief = (lines[0] if lines else "no details")[:160]
        raise ConfigError(f"{PROGRAM_FILE}: torch.export cannot trace the adapted model of "
                          f"{what} ({type(exc).__name__}: {brief}); model.pt and plan.json "
                          "are written: load it with autometa.load_model, or use "
                          "`autometa predict`") from exc


def _onnx(exported: torch.export.ExportedProgram, example: Tensor, directory: Path
          ) -> Path | str:
    """``directory/model.onnx`` from the exported program (``torch.onnx.export``, the
    dynamo exporter), or the line that says why not (no ``onnx`` package; refused)."""
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") \
            is None:
        return (f"{ONNX_FILE}: not written: the onnx and onnxscript packages are not "
                "installed (pip install 'autometa-ml[onnx]')")
    import logging
    import warnings

    path, tmp = directory / ONNX_FILE, directory / f".{ONNX_FILE}.tmp.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet = logging.getLogger("torch.onnx")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                torch.onnx.export(exported, (example,), str(tmp), dynamo=True,
                                  external_data=False, verbose=False)
            finally:
                quiet.setLevel(level)
        tmp.replace(path)
    except Exception as exc:  # the ONNX exporter raises its own types
        cause: BaseException = exc
        while cause.__cause__ is not None:  # its own error wraps the operator's
            cause = cause.__cause__
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()  # colour codes
        brief = (text.splitlines() or ["no details"])[0][:160]
        operator = re.search(r"op='([\w.]+)'", text)  # an operator ONNX has no function for
        if operator is not None:
            brief = f"no ONNX function for {operator.group(1)}"
        return f"{ONNX_FILE}: not written ({brief}); {PROGRAM_FILE} is written"
    finally:
        tmp.unlink(missing_ok=True)
    return path
