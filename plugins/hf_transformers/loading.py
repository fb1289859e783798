"""Reading a local ``save_pretrained`` directory: its config, image processor and weights.

Uses the transformers API (Wolf et al. 2020, https://huggingface.co/docs/transformers):
``AutoConfig.from_pretrained``, ``ImageProcessingMixin.get_image_processor_dict`` and
``AutoModel.from_pretrained``, always with ``local_files_only=True``: nothing is ever
downloaded, and nothing global is set (transformers' process-wide progress-bar switch is
off only while loading). Every
failure is one line naming the path and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from autometa import ConfigError, DataError, PluginError
from autometa_plugins.hf_transformers import missing_reason

log = logging.getLogger(__name__)

#: A Hugging Face hub name: "owner/name" (what from_pretrained would download).
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: Mean and deviation when the directory has no preprocessor_config.json: CLIP's own for
#: CLIP models (what OpenAI trained with), else ImageNet's (DINOv2's and most ViTs').
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def transformers() -> ModuleType:
    """The ``transformers`` module, or a PluginError saying how to install it."""
    reason = missing_reason()
    if reason:
        raise PluginError(reason)
    try:
        return importlib.import_module("transformers")
    except Exception as exc:  # e.g. built for another torch
        raise PluginError(f"transformers cannot be imported ({type(exc).__name__}: {exc}); "
                          "reinstall it: pip install 'autometa-ml[hf]'") from exc


def locate(path: str | os.PathLike[str] | None) -> tuple[Path, Path | None]:
    """The ``save_pretrained`` directory and, for the file form, the ``.safetensors`` file.

    Raises:
        ConfigError: no path, a hub name, a missing path, a file that is not
            ``.safetensors``, or a directory without ``config.json``.
    """
    if path is None or str(path) == "":
        raise ConfigError("transformers.path: no model directory given; set it to a local "
                          "directory written by save_pretrained (--param transformers.path=DIR)")
    given = Path(path).expanduser()
    if not given.exists():
        if HUB_NAME.fullmatch(str(path)) and not str(path).startswith("."):
            raise ConfigError(
                f"transformers.path '{path}' looks like a Hugging Face hub name, and nothing "
                "is downloaded; on a machine with internet run AutoModel.from_pretrained("
                f"'{path}').save_pretrained(DIR) and AutoImageProcessor.from_pretrained("
                f"'{path}').save_pretrained(DIR), copy DIR here and set transformers.path=DIR")
        raise ConfigError(f"transformers.path '{given}' does not exist; set it to a local "
                          "directory written by save_pretrained (nothing is downloaded)")
    weights = None
    if given.is_file():
        if given.suffix != ".safetensors":
            raise ConfigError(f"transformers.path '{given}' is a file but not .safetensors; "
                              "set it to the directory written by save_pretrained")
        weights, given = given, given.parent
    if not (given / "config.json").is_file():
        raise ConfigError(f"transformers.path '{given}' has no config.json; set it to a "
                          "directory written by save_pretrained (the model's config and weights)")
    return given, weights


def vision_config(hf: ModuleType, directory: Path) -> tuple[Any, str]:
    """The config of the directory's vision model, and the directory's model type.

    A composite model (CLIP: ``model_type`` "clip") gives its vision tower's config.
    """
    try:
        config = hf.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # unknown model type, broken JSON, ...
        raise ConfigError(f"transformers.path '{directory}': config.json cannot be read: "
                          f"{_first_line(exc)}") from None
    model_type = str(getattr(config, "model_type", "?"))
    sub = getattr(config, "vision_config", None)
    return (sub if sub is not None else config), model_type


def model_class(hf: ModuleType, config: Any, directory: Path, model_type: str) -> type:
    """The class AutoModel maps ``config`` to; ConfigError unless it is a vision model."""
    try:
        cls: type = hf.AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        cls = type(None)
    params = inspect.signature(cls.forward).parameters if cls is not type(None) else {}
    if "pixel_values" not in params or "input_ids" in params:
        raise ConfigError(
            f"transformers.path '{directory}' holds a {model_type!r} model, which has no "
            "vision tower (a model taking pixel_values alone); use a ViT, DINOv2 or CLIP "
            "directory")
    return cls


@dataclass(frozen=True)
class Processing:
    """What the directory's image processor does that the features module reproduces."""

    size: tuple[int, int] | None  # (height, width) the model is fed; None: unknown
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where mean/std come from, for the log


def processing(hf: ModuleType, directory: Path, model_type: str) -> Processing:
    """Size, mean and deviation from ``preprocessor_config.json``, else the defaults."""
    fallback = CLIP_MEAN_STD if "clip" in model_type else IMAGENET_MEAN_STD
    if not (directory / "preprocessor_config.json").is_file():
        return Processing(None, *fallback, source="defaults (no preprocessor_config.json)")
    try:
        found, _ = hf.ImageProcessingMixin.get_image_processor_dict(directory,
                                                                     local_files_only=True)
    except Exception as exc:
        raise DataError(f"transformers.path '{directory}': preprocessor_config.json cannot be "
                        f"read: {_first_line(exc)}; save it again or delete it") from None
    mean, std = found.get("image_mean"), found.get("image_std")
    if mean is None or std is None:
        mean, std = fallback
    elif isinstance(mean, (int, float)):  # a single value for every channel
        mean, std = (float(mean),) * 3, (float(std),) * 3
    chosen = found.get("crop_size") if found.get("do_center_crop") else None
    return Processing(_size(chosen or found.get("size")), tuple(map(float, mean)),
                      tuple(map(float, std)), source="preprocessor_config.json")


def _size(size: Any) -> tuple[int, int] | None:
    """(height, width) of an image processor's ``size``/``crop_size`` setting."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def load(cls: Any, config: Any, directory: Path, weights: Path | None,
         extra: dict[str, Any]) -> nn.Module:
    """The vision model with the directory's (or the file's) weights, float32, on the CPU.

    Raises:
        DataError: the weights cannot be read, or leave tensors of the model missing
            (randomly initialised weights are never used silently).
    """
    where = weights or directory
    try:
        with _quiet_loading_report():
            if weights is None:
                has_safetensors = any(directory.glob("*.safetensors"))
                net, info = cls.from_pretrained(
                    directory, config=config, local_files_only=True, output_loading_info=True,
                    use_safetensors=True if has_safetensors else None, **extra)
            else:
                from safetensors.torch import load_file

                net, info = cls.from_pretrained(
                    None, config=config, state_dict=load_file(weights), local_files_only=True,
                    output_loading_info=True, **extra)
    except Exception as exc:
        raise DataError(f"transformers.path '{where}': the weights cannot be loaded: "
                        f"{_first_line(exc)}; save the model again with save_pretrained") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise DataError(
            f"transformers.path '{where}' lacks {len(missing)} tensor(s) of the "
            f"{cls.__name__} (e.g. {missing[0]!r}); they would be random: use the directory "
            "the model was saved to, or another pooling")
    unused = len(info.get("unexpected_keys") or ())
    if unused:  # e.g. CLIP's text tower: not part of the vision model
        log.info("transformers: %s loaded from %s; %d tensor(s) of the file not used",
                 cls.__name__, where, unused)
    return net.float()  # half-precision checkpoints: float32 for meta-training


@contextmanager
def _quiet_loading_report() -> Iterator[None]:
    """Drop transformers' multi-line loading report (this thread's records only) while we
    load: unused tensors (CLIP's text tower) are expected, missing ones are our error. Its
    "Loading weights" progress bar is off while we load (a search draws its own display;
    transformers has only a process-wide switch, restored after)."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers.modeling_utils")
    me = threading.get_ident()
    only_others = _OtherThreads(me)
    logger.addFilter(only_others)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(only_others)
        if bar:
            hf_logging.enable_progress_bar()


class _OtherThreads(logging.Filter):
    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= logging.ERROR


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
