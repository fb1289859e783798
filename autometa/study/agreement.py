"""Whether this machine's autometa and plugins agree with a stored study, and the
requirements a study pins.

A study stores the autometa version that made it, the distribution and version of every
plugin it used (the task, the searched algorithms and sources, and those of its
baselines) and the search spaces it resolved (:mod:`autometa.study.settings`). A process
that joins it (``autometa worker``, a resuming ``autometa run``) must run the same code,
or its trials are not comparable with the others, or fail one by one ("unexpected keyword
argument"). Before anything runs, :func:`check_agreement` compares:

* **the spaces, always**: every hyperparameter a stored space holds must be a keyword the
  installed plugin's constructor takes, and every stored value (a fixed value, each
  choice of a categorical, a range's bounds) must parse as its declared type
  (:func:`autometa.params.parse`); likewise the task's stored settings. A difference is
  refused whatever the versions say.
* **the versions**, of autometa (distribution ``autometa-ml``) and of each plugin's
  distribution, compared with :mod:`packaging.version` (PEP 440): another major or minor
  version is refused; the same ``major.minor`` with another patch, post-release or local
  label (``1.0.0`` and ``1.0.1``, ``1.0.0+cu121``) is allowed with one warning per
  distribution, since a patch release promises the same results. A pre-release or
  development build (``1.1.0rc1``, ``1.1.0.dev3``) promises nothing between builds: any
  difference from or to one is refused. A version PEP 440 cannot read is compared as
  text. A plugin registered in-process (by code, no distribution) on either side is
  compared by its spaces only.

A refusal is one :class:`~autometa.errors.ConfigError` line naming the difference and the
fix; :func:`requirements` writes the study's pins as a pip requirements file
(``autometa requirements STUDY --storage URL``), so that a cluster image can be built
with them and checked (``--check``) before it runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any, Literal

import optuna
from packaging.version import InvalidVersion, Version

from autometa.errors import AutometaError, ConfigError, PluginError
from autometa.params import declared_types, parse
from autometa.plugins import DISTRIBUTION, Kind, PluginHost
from autometa.space import Categorical, Float, Int, from_json
from autometa.study.settings import stored_settings
from autometa.study.storage import open_storage, study_exists
from autometa.version import __version__

log = logging.getLogger(__name__)

#: How two versions of one distribution differ (see the module docstring).
Level = Literal["same", "patch", "other"]

IN_PROCESS = " (in-process)"


def difference(made: str, here: str) -> Level:
    """How version ``here`` differs from ``made``: ``"same"`` (equal under PEP 440),
    ``"patch"`` (same major.minor, neither a pre-release or development build), else
    ``"other"``."""
    if made == here:
        return "same"
    try:
        old, new = Version(made), Version(here)
    except InvalidVersion:
        return "other"
    if old == new:  # 1.0 and 1.0.0
        return "same"
    if (old.release + (0,))[:2] != (new.release + (0,))[:2]:
        return "other"
    if old.is_prerelease or new.is_prerelease:  # .dev and rc builds included
        return "other"
    return "patch"


def _origin(text: str) -> tuple[str | None, str]:
    """``(distribution, version)`` of a stored ``"dist version"``; ``(None, text)`` for
    ``"plugin (in-process)"``."""
    if text.endswith(IN_PROCESS) or " " not in text:
        return None, text
    dist, version = text.rsplit(" ", 1)
    return dist, version


def _pin(dist: str, version: str) -> str:
    return f"install {dist}=={version} on this machine (pip install '{dist}=={version}')"


def requirements(stored: Mapping[str, Any]) -> list[str]:
    """The pip requirements lines of a study's stored settings: ``autometa-ml==X``, then
    ``dist==version`` for each plugin distribution (sorted), then a comment naming each
    plugin it used that no distribution installs (registered in-process)."""
    pins = {DISTRIBUTION: stored.get("autometa_version", __version__)}
    loose: list[str] = []
    for kind, group in stored.get("plugins", {}).items():
        for name, text in group.items():
            dist, version = _origin(text)
            if dist is None:
                loose.append(f"{kind} {name!r} of plugin {version.removesuffix(IN_PROCESS)!r}")
            else:
                pins.setdefault(dist, version)
    lines = [f"{DISTRIBUTION}=={pins.pop(DISTRIBUTION)}",
             *(f"{d}=={v}" for d, v in sorted(pins.items(), key=lambda p: p[0].lower()))]
    if loose:
        lines.append(f"# registered by code, not installed by pip: {', '.join(loose)}")
    return lines


def check_agreement(stored: Mapping[str, Any], host: PluginHost, study: str
                    ) -> list[str]:
    """Compare a study's stored versions and spaces with what ``host`` has installed.

    Args:
        stored: the study's stored settings (:func:`~autometa.study.settings.
            stored_settings`); a study made before versions or spaces were stored is
            checked on what it holds.
        host: this machine's plugins.
        study: the study's name, for messages.

    Returns:
        One warning line per distribution whose version differs at patch level only, each
        also logged as a warning.

    Raises:
        ConfigError: a difference that changes results (module docstring), one line naming
            it and the fix; a plugin the study used that is not usable here.
    """
    plugins = stored.get("plugins", {})
    spaces = stored.get("spaces", {})
    made: dict[str, str] = {}  # distribution -> the version that made the study
    if "autometa_version" in stored:
        made[DISTRIBUTION] = str(stored["autometa_version"])
    here = {DISTRIBUTION: __version__}
    task = stored.get("config", {}).get("task")
    used: list[tuple[Kind, str, dict[str, Any]]] = []
    if task:
        params = dict(stored.get("config", {}).get("task_params", {}))
        for name in spaces.get("task", {}):  # per-trial settings: stored as user ranges
            params.pop(name, None)
        used.append(("task", task, {n: {"type": "fixed", "value": v} for n, v in params.items()}))
    kinds: tuple[Kind, ...] = ("algorithm", "source")
    for kind in kinds:
        names = dict.fromkeys([*spaces.get(kind, {}), *plugins.get(kind, {})])
        used += [(kind, name, spaces.get(kind, {}).get(name, {})) for name in names]
    for kind, name, space in used:
        origin = plugins.get(kind, {}).get(name)
        dist, version = _origin(origin) if origin else (None, "")
        told = f"{kind} {name!r} from {origin or 'a plugin'}"
        fix = (_pin(dist, version) if dist else "register the plugin it was made with")
        try:
            reg = host.get(kind, name)
            cls = reg.load()
        except PluginError as exc:
            raise ConfigError(f"study {study!r} searched {kind} {name!r}, which is not usable "
                              f"now ({exc}); it was made with {origin or 'a plugin'}: {fix} "
                              "to resume, or start a new study") from None
        mine = f"{reg.distribution} {reg.version}" if reg.distribution else "in-process"
        _check_space(study, told, f"{name!r} ({mine})", cls, space, fix)
        if dist is None or reg.distribution is None:
            continue  # registered by code on one side: its spaces are all there is
        if reg.distribution.lower().replace("_", "-") != dist.lower().replace("_", "-"):
            raise ConfigError(f"study {study!r} was made with {told}; here {name!r} comes "
                              f"from {mine}; {fix}, or start a new study")
        made.setdefault(dist, version)
        here.setdefault(dist, reg.version or "")
    notes = []
    for dist, version in made.items():
        level = difference(version, here[dist])
        if level == "other":
            raise ConfigError(f"study {study!r} was made with {dist} {version}; this machine "
                              f"has {dist} {here[dist]} ({_why(version, here[dist])}); "
                              f"{_pin(dist, version)}, or start a new study")
        if level == "patch":
            notes.append(f"study {study!r} was made with {dist} {version}; this machine has "
                         f"{here[dist]} (the same {_minor(version)} series: allowed, results "
                         f"should agree; pin {dist}=={version} for identical code)")
    for note in notes:
        log.warning("%s", note)
    return notes


def _why(made: str, here: str) -> str:
    try:
        old, new = Version(made), Version(here)
    except InvalidVersion:
        return "another version"
    if old.is_prerelease or new.is_prerelease:
        return "a pre-release or development build on one side"
    return "another major or minor version"


def _minor(version: str) -> str:
    release = Version(version).release + (0,)
    return f"{release[0]}.{release[1]}"


def _check_space(study: str, told: str, mine: str, cls: Any, space: Mapping[str, Any],
                 fix: str) -> None:
    """Every stored hyperparameter of ``space`` (JSON, :func:`~autometa.space.to_json`) is
    a constructor keyword of ``cls``, and every stored value parses as its type."""
    types = declared_types(cls)
    try:
        takes_any = any(p.kind is p.VAR_KEYWORD
                        for p in inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        takes_any = True
    for key, param in from_json(space).items():
        if key not in types:
            if takes_any:
                continue
            raise ConfigError(f"study {study!r} was made with {told} whose space has {key!r}; "
                              f"the installed {mine} does not accept {key!r}; {fix}, or start "
                              "a new study")
        if isinstance(param, Categorical):
            values = list(param.choices)
        elif isinstance(param, Float | Int):
            values = [param.low, param.high]
        else:
            values = [param]
        for value in values:
            try:
                parse(key, types[key], value)
            except AutometaError as exc:
                raise ConfigError(f"study {study!r} was made with {told} whose space has "
                                  f"{key!r} = {value!r}; the installed {mine} does not accept "
                                  f"it ({exc}); {fix}, or start a new study") from None


def read_stored(storage: str, study: str) -> dict[str, Any]:
    """The stored settings of study ``study`` at ``storage`` (empty: no such study, or not
    autometa's); creates and writes nothing."""
    if not study_exists(storage, study):
        return {}
    store = open_storage(storage, must_exist=True, create_tables=False)
    return stored_settings(optuna.load_study(study_name=study, storage=store))

