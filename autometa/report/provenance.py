"""Where a study's results come from, and the command that reproduces its search.

Read from the settings the study stored when it was created (its ``autometa.config``
user attribute): the autometa and plugin versions, the seed, the task's parameters and
description, the storage (its password already redacted), and the search settings as a
YAML config without this machine's own keys, so that ``autometa run --config`` repeats it
(``threads`` stays: the numbers depend on it). The Python and torch versions and the time
the report was made are those of the machine that made it.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import yaml

from autometa.report.html import Markup, join, key_values, note, tag
from autometa.study.settings import MACHINE_KEYS
from autometa.study.settings import stored_settings as study_settings

if TYPE_CHECKING:
    import optuna

    from autometa.report.board import Board

#: Longest value shown in a key/value table (a task's class names can be many).
MAX_VALUE = 2000


def stored_settings(board: Board, study: optuna.Study | None) -> dict[str, Any]:
    """The study's stored settings: ``board.stored``, else the study's attribute, else {}."""
    if board.stored:
        return board.stored
    return study_settings(study) if study is not None else {}


#: Machine keys kept in the reproducing config: the numbers depend on them.
KEPT_MACHINE_KEYS = ("threads",)
#: The YAML comment above each kept machine key.
KEPT_COMMENTS = {
    "threads": "# threads: the torch CPU threads the trials ran with; the numbers depend on it",
}


def reproduce_config(config: dict[str, Any]) -> dict[str, Any]:
    """The search settings without the keys each machine sets for itself, except those
    the numbers depend on (:data:`KEPT_MACHINE_KEYS`, when the study stored a value)."""
    return {k: v for k, v in config.items() if k not in MACHINE_KEYS
            or (k in KEPT_MACHINE_KEYS and v is not None)}


def reproduce_yaml(config: dict[str, Any]) -> str:
    """:func:`reproduce_config` as YAML, each kept machine key last, under its comment."""
    settings = reproduce_config(config)
    kept = {k: settings.pop(k) for k in KEPT_MACHINE_KEYS if k in settings}
    text = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    for key, value in kept.items():
        text += KEPT_COMMENTS[key] + "\n" + yaml.safe_dump({key: value}, sort_keys=False)
    return text


def made_with() -> list[tuple[object, object]]:
    """When, and with which Python and torch, this report is made."""
    import torch

    return [("report made at (UTC)",
             datetime.now(timezone.utc).isoformat(timespec="seconds")),
            ("Python version", platform.python_version()),
            ("torch version", str(torch.__version__))]


def provenance_section(board: Board, stored: dict[str, Any], command: str | None,
                       level: int) -> Markup:
    """Versions, seed, task, storage, the reproducing config and command."""
    h = f"h{level}"
    made: list[tuple[object, object]] = [("report made by", tag("code", command))] if command \
        else []
    parts: list[object] = [key_values(made + made_with())]
    if not stored:
        parts.append(note("this study stored no autometa settings: provenance unknown"))
        return join(parts)
    config: dict[str, Any] = stored.get("config") or {}
    facts: list[tuple[object, object]] = [
        ("autometa version", stored.get("autometa_version", "not recorded")),
        ("task", config.get("task", board.task)),
        ("seed", config.get("seed", "not recorded")),
        ("storage", config.get("storage", "not recorded")),
    ]
    for key in ("algorithms", "sources", "n_trials", "meta_steps", "eval_every",
                "trial_timeout", "pruner", "pruner_resource", "sampler", "initial",
                "warm_start", "top_k"):
        if key in config and (key != "trial_timeout" or config[key] is not None):
            facts.append((key, _text(config[key])))
    parts.append(key_values(facts))

    plugins = stored.get("plugins")
    parts.append(tag(h, "plugins"))
    if isinstance(plugins, dict) and plugins:
        rows = []  # {kind: {name: "plugin (distribution version)"}}, or {name: text}
        for key, value in plugins.items():
            if isinstance(value, dict):
                rows += [(f"{key} {name}", _text(text)) for name, text in value.items()]
            else:
                rows.append((str(key), _text(value)))
        parts.append(key_values(rows))
    else:
        parts.append(note("plugin versions were not recorded by the autometa that made "
                          "this study"))

    parts.append(tag(h, "task parameters"))
    task_params = config.get("task_params") or {}
    parts.append(key_values((k, _text(v)) for k, v in sorted(task_params.items()))
                 if task_params else note("the task's defaults (no parameter given)"))
    description = stored.get("task")
    if isinstance(description, dict) and description:
        parts.append(tag(h, "task description"))
        split = description.get("classes_by_split")
        parts.append(key_values((k, _text(v)) for k, v in description.items()
                                if not (k == "classes_by_split" and isinstance(split, dict))))
        if isinstance(split, dict):  # every class, never cut: which went where
            parts.append(tag(h, "classes of each split"))
            parts.append(key_values(
                (f"{name} ({len(classes)})", ", ".join(map(str, classes)))
                for name, classes in split.items() if isinstance(classes, list)))

    if config:
        name = board.study_name
        parts.append(tag(h, "reproduce this search"))
        parts.append(tag("p", Markup(
            f"Save this as {tag('code', name + '.yaml')} and run "
            f"{tag('code', f'autometa run --config {name}.yaml')} (add this machine's "
            f"{tag('code', '--storage')}, {tag('code', '--device')} or "
            f"{tag('code', '--workers')} as needed):")))
        parts.append(tag("pre", tag("code", reproduce_yaml(config))))
    return join(parts)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           ensure_ascii=False)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 3] + "..."
