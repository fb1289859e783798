"""Search configuration: one dataclass, validated once at the edge.

The same names are used everywhere: keyword arguments of :func:`autometa.search`, keys
of a TOML/YAML config file, and (with dashes) flags of ``autometa run``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autometa.errors import ConfigError, closest, redact
from autometa.precision import precision_choices

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Embedded, on-disk storage in the working directory: a search survives a crash.
DEFAULT_STORAGE = "sqlite:///autometa.db"

#: Bounds of numeric settings. Seeds feed numpy's and torch's generators (32 bits).
MAX_SEED = 2**32 - 1
MAX_COUNT = 10**9  # trials, meta-steps, top_k
MAX_THREADS = 4096
MAX_WORKERS = 1024
MAX_TIMEOUT = 10 * 365 * 86400.0  # seconds
#: Names accepted by the search-strategy settings (see SearchConfig).
PRUNERS = ("median", "hyperband", "wilcoxon", "none")
#: What Hyperband's budget counts (``pruner_resource``).
RESOURCES = ("meta_steps", "seconds")
SAMPLERS = ("tpe", "random")
INITIALS = ("portfolio", "none")
#: Names of pruners and samplers registered by plugins (checked against the plugins in
#: ``prepare``, where the host is known) and of plugins in ``plugins`` (entry-point names).
PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Study names also name report and artifact files: no path separators.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


@dataclass
class SearchConfig:
    """Everything that defines a search. Unknown keys and bad values raise ConfigError."""

    task: str  # task plugin name, e.g. "sinusoid"
    # keyword arguments of the task; and its per-trial settings (its trial_params, e.g.
    # augmentation) as algorithm_params: value | [choices] | {low, high} (default: fixed)
    task_params: dict[str, Any] = field(default_factory=dict)
    # [] = every compatible one but NOT_SEARCHED_BY_DEFAULT's (the baselines run them)
    algorithms: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    # {plugin: {hyperparameter: value | [choices] | {low, high}}}: fix, restrict or narrow
    algorithm_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_trials: int | None = 20  # trials to finish in this study (counting earlier runs)
    timeout: float | None = None  # stop starting trials after this many seconds
    meta_steps: int = 500  # meta-training budget of one trial
    eval_every: int = 100  # meta-val evaluation (and pruning check) interval, in meta-steps
    # seconds of meta-training per trial (meta-val evaluations excluded; checked after
    # each meta-step, so one step may run over): a trial that reaches it stops
    # meta-training there and is scored on the model as it is; None: no limit
    trial_timeout: float | None = None
    seed: int = 0  # seeds the sampler, the task's data and every trial
    study_name: str | None = None  # default: "<task>-seed<seed>"
    storage: str = DEFAULT_STORAGE  # any Optuna storage URL
    # where trial states go: a directory (for many machines, one they all mount) or
    # s3://bucket; states sit in <artifacts>/<id> (Optuna's artifact store)
    artifacts: str = "autometa-artifacts"
    keep: int | str = "all"  # trial states kept: "all", or those of the best k on meta-val
    # relative paths of input files (CSVs, image folders, checkpoints) resolve against
    # this directory; None: the working directory
    data_root: str | None = None
    # where decoded-image stores are cached (this machine's; never stored in the study):
    # None = $AUTOMETA_CACHE_DIR, else $XDG_CACHE_HOME/autometa or ~/.cache/autometa
    cache_dir: str | None = None
    device: str = "cpu"  # torch device of every trial, e.g. "cuda:0" (when devices is empty)
    # torch devices the trials run on, one trial per device slot at a time, e.g.
    # ["cuda:0", "cuda:1"]; "cuda" = every visible GPU; [] = [device]
    devices: list[str] = field(default_factory=list)
    workers: int | None = None  # trials at once (worker processes); None: one per device
    threads: int | None = None  # torch CPU threads during the search (None: torch's default)
    # arithmetic of meta-training, meta-val and meta-test: "float32", or "bf16"
    # (torch.autocast to bfloat16; parameters stay float32); a list, e.g. ["float32",
    # "bf16"], searches it per trial as the categorical hyperparameter "precision"
    precision: str | list[str] = "float32"
    top_k: int = 3  # best trials (on meta-val) evaluated on meta-test
    # stops unpromising trials: "hyperband" (over meta-steps, meta_steps the largest
    # budget), "median" (Optuna's median rule over meta-val at each evaluation),
    # "wilcoxon" (a paired test over the final meta-val episodes), "none", or a pruner a
    # plugin registers; the default was chosen by benchmarks/search_efficiency.py (README,
    # Search strategies)
    pruner: str = "hyperband"
    # what Hyperband's budget counts: "meta_steps" (from eval_every to meta_steps) or
    # "seconds" of meta-training (up to trial_timeout, which it then needs)
    pruner_resource: str = "meta_steps"
    # proposes configurations: "tpe" (multivariate TPE), "random", or a plugin's sampler
    sampler: str = "tpe"
    # trials run before the sampler takes over: "portfolio" = every (algorithm, source)
    # pair once with its plugins' defaults (their papers' settings); "none"
    initial: str = "portfolio"
    # earlier studies whose best configurations run first: "study" (this storage) or
    # "study@storage-url"; those whose plugins or spaces no longer match are skipped
    warm_start: list[str] = field(default_factory=list)
    # baseline trials first (classification tasks): nearest centroid, linear probe and
    # linear SVM, never meta-trained, on the raw inputs and on each searched source with
    # pre-trained features, at their defaults; they use no budget (README: Baselines).
    # Queued when the study is created: a resume does not change them
    baselines: bool = True
    # plugins' own settings, {plugin entry-point name: {key: value}} ([plugins.NAME] in a
    # file, --plugin-option NAME.KEY=VALUE): given to that plugin's hooks and report
    # formats. This machine's, like storage: never stored in the study nor shown in reports
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> SearchConfig:
        """Build from a mapping; unknown keys get the closest valid name in the error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(
                    f"{where}: unknown key {key!r}{closest(str(key), names)}; "
                    f"valid keys: {', '.join(names)}"
                )
        if "task" not in data:
            raise ConfigError(f"{where}: missing required key 'task' (a task plugin name)")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SearchConfig:
        """Read a ``.toml`` or ``.yaml``/``.yml`` file; ``overrides`` win over its keys.

        Raises:
            ConfigError: the file is missing, a directory, not UTF-8, not valid TOML/YAML
                (YAML aliases are refused: a few hundred bytes of nested aliases expand to
                gigabytes), or not a table of valid settings.
        """
        data = read_config_file(Path(path))
        return cls.from_dict({**data, **overrides}, where=str(path))

    # -- derived -------------------------------------------------------------------------
    @property
    def study(self) -> str:
        """The study name in the storage."""
        return self.study_name or f"{self.task}-seed{self.seed}"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed study must share with the one it continues."""
        keep = {"task", "task_params", "algorithms", "sources", "algorithm_params",
                "source_params", "meta_steps", "eval_every", "trial_timeout", "seed",
                "pruner", "pruner_resource", "sampler", "initial", "warm_start", "precision"}
        out = {k: v for k, v in asdict(self).items() if k in keep}
        out["warm_start"] = [redact(w) for w in self.warm_start]  # stored without passwords
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        _expect(self.task, str, "task", "a task plugin name")
        _expect(self.task_params, dict, "task_params", "a table of task parameters")
        for key in ("algorithms", "sources", "devices", "warm_start"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(self, key, value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}: expected a list of names, got {value!r}")
        for key in ("algorithm_params", "source_params"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(
                    f"{key}: expected a table per plugin, e.g. {{maml = {{inner_steps = 1}}}}, "
                    f"got {value!r}"
                )
        if self.n_trials is not None:
            _positive_int(self.n_trials, "n_trials")
        for key in ("timeout", "trial_timeout"):
            _seconds(getattr(self, key), key)
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("set n_trials, timeout or both: a search needs a budget")
        _positive_int(self.meta_steps, "meta_steps")
        _positive_int(self.eval_every, "eval_every")
        _positive_int(self.top_k, "top_k")
        if self.threads is not None:
            _positive_int(self.threads, "threads", MAX_THREADS)
        if self.workers is not None:
            _positive_int(self.workers, "workers", MAX_WORKERS)
        choices = precision_choices(self.precision)
        self.precision = choices[0] if len(choices) == 1 else choices
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: expected an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.study_name is not None:
            check_study_name(self.study_name)
        _expect(self.storage, str, "storage", "an Optuna storage URL such as sqlite:///x.db")
        if self.storage.startswith("sqlite") and (
                ":memory:" in self.storage or self.storage.split("?")[0] == "sqlite://"):
            # Each Optuna storage object opens its own connection, and an in-memory SQLite
            # database is one connection's: the worker's trials would land in another.
            raise ConfigError(f"storage {self.storage!r} is an in-memory database, which "
                              "lasts one connection while a search opens several; give a "
                              "file, e.g. sqlite:///autometa.db (or a temporary folder's)")
        _expect(self.artifacts, str, "artifacts", "a directory path or s3://bucket")
        if self.keep != "all":
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) \
                    or not 1 <= self.keep <= MAX_COUNT:
                raise ConfigError(f"keep: expected 'all' or a number of trials (the best on "
                                  f"meta-val) from 1 to {MAX_COUNT:,}, got {self.keep!r}")
            if self.keep < self.top_k:
                raise ConfigError(f"keep: {self.keep} is fewer than top_k={self.top_k}, the "
                                  "trials whose states the leaderboard loads; raise keep or "
                                  "lower top_k")
        if self.data_root is not None:
            _expect(self.data_root, str, "data_root", "a directory path")
            if not Path(self.data_root).is_dir():
                raise ConfigError(f"data_root: {self.data_root!r} is not a directory; give "
                                  "the directory that relative input paths are under")
        if self.cache_dir is not None:
            _expect(self.cache_dir, str, "cache_dir", "a directory path")
        _expect(self.device, str, "device", "a torch device such as 'cpu' or 'cuda:0'")
        for key, names in (("pruner", PRUNERS), ("sampler", SAMPLERS)):
            value = getattr(self, key)  # a plugin's name is checked by prepare, on the host
            if not (isinstance(value, str) and PLUGIN_NAME.fullmatch(value)):
                raise ConfigError(f"{key}: expected one of {', '.join(map(repr, names))} or "
                                  f"the name of a {key} a plugin registers, got {value!r}")
        self._validate_resource()
        if self.initial not in INITIALS:
            raise ConfigError(f"initial: expected one of {', '.join(map(repr, INITIALS))}, got "
                              f"{self.initial!r}{closest(str(self.initial), list(INITIALS))}")
        if not isinstance(self.baselines, bool):
            raise ConfigError(f"baselines: expected true or false, got {self.baselines!r}")
        check_plugin_options(self.plugins)
        for entry in self.warm_start:
            name, url = split_study_ref(entry, self.storage)
            check_study_name(name)
            if not url:
                raise ConfigError(f"warm_start: {entry!r} has no storage URL after '@'; give "
                                  "'study' (this storage) or 'study@sqlite:///other.db'")


    def _validate_resource(self) -> None:
        """``pruner_resource``: one of :data:`RESOURCES`; seconds for Hyperband, up to a
        ``trial_timeout``."""
        if self.pruner_resource not in RESOURCES:
            raise ConfigError(f"pruner_resource: expected one of "
                              f"{', '.join(map(repr, RESOURCES))}, got {self.pruner_resource!r}"
                              f"{closest(str(self.pruner_resource), list(RESOURCES))}")
        if self.pruner_resource == "seconds" and self.pruner != "hyperband":
            raise ConfigError(f"pruner_resource: 'seconds' is a budget for the hyperband "
                              f"pruner, not {self.pruner!r}; set pruner = 'hyperband', or "
                              "pruner_resource = 'meta_steps'")
        if self.pruner_resource == "seconds" and self.trial_timeout is None:
            raise ConfigError("pruner_resource: 'seconds' needs trial_timeout, Hyperband's "
                              "largest budget in seconds of meta-training; set it (e.g. "
                              "trial_timeout = 300, --trial-timeout 300)")


#: Fingerprint settings added after studies were stored, with the value such a study ran
#: with: a resume compares them as if the study had stored them (other settings a study
#: did not store are not compared).
FINGERPRINT_SINCE: dict[str, Any] = {"trial_timeout": None, "pruner_resource": "meta_steps",
                                     "precision": "float32"}


def check_plugin_options(options: Any) -> None:
    """Raise :class:`ConfigError` unless ``options`` is ``{plugin name: {key: value}}``
    (plugin names as entry points spell them; keys are names; values are TOML values)."""
    example = "e.g. [plugins.my-reporter] with path = \"out.json\""
    if not isinstance(options, dict):
        raise ConfigError(f"plugins: expected a table per plugin ({example}), got "
                          f"{type(options).__name__}")
    for name, table in options.items():
        if not (isinstance(name, str) and PLUGIN_NAME.fullmatch(name)):
            raise ConfigError(f"plugins: {name!r} is not a plugin name (see `autometa plugins`)")
        if not isinstance(table, dict):
            raise ConfigError(f"plugins.{name}: expected a table of settings ({example}), got "
                              f"{type(table).__name__}")
        for key in table:
            if not (isinstance(key, str) and key.isidentifier()):
                raise ConfigError(f"plugins.{name}: setting {key!r} is not a name; use "
                                  "letters, digits and '_'")


def _expect(value: Any, kind: type, key: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is str and not value):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _seconds(value: Any, key: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None or a number of seconds in
    (0, :data:`MAX_TIMEOUT`] (NaN and infinity are not)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 < value <= MAX_TIMEOUT):
        raise ConfigError(f"{key}: expected a number of seconds in (0, {MAX_TIMEOUT:g}], got "
                          f"{value!r}")


def _positive_int(value: Any, key: str, most: int = MAX_COUNT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ConfigError(f"{key}: expected an integer from 1 to {most:,}, got {value!r}")


def check_study_name(name: Any) -> str:
    """``name`` if it is a valid study name, which also names report and artifact files.

    Raises:
        ConfigError: not 1-128 letters, digits, ``.``, ``_``, ``-``, ``+`` or ``=``
            starting with a letter or digit (so never a path: no ``/``, ``..`` or NUL).
    """
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ConfigError(
            f"study name {shown} is not a name: use 1 to 128 letters, digits, '.', '_', '-', "
            "'+' or '=', starting with a letter or digit (it names report files)"
        )
    return name


def split_study_ref(entry: str, storage: str) -> tuple[str, str]:
    """``(study, storage URL)`` of a warm-start entry: ``"study"`` (in ``storage``, this
    search's) or ``"study@url"`` (study names never contain ``@``; URLs may)."""
    name, at, url = entry.partition("@")
    return name, (url if at else storage)


def check_writable_dir(path: Path, key: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is, or can be made, a writable directory.

    Nothing is created: the nearest existing ancestor must be a writable directory.
    """
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == path else f"is under {str(probe)!r}, a file"
        raise ConfigError(f"{key}: {str(path)!r} {what}; give a directory path")
    try:  # permissions alone miss read-only mounts and pseudo-filesystems such as /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: {str(path)!r} is not writable (cannot create a file in "
                          f"{str(probe)!r}: {exc.strerror}); give a writable directory"
                          ) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings table of a TOML or YAML file (see :meth:`SearchConfig.from_file`)."""
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory; give a .toml, .yaml or .yml file")
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():
        raise ConfigError(f"{where} is not a regular file (a device, FIFO or socket); give a "
                          ".toml, .yaml or .yml file")
    if path.suffix not in {".toml", ".yaml", ".yml"}:
        raise ConfigError(f"{where}: unknown format {path.suffix!r}; use .toml, .yaml or .yml")
    try:
        with path.open("rb") as handle:  # bounded: never more than the limit in memory
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a "
                              "config file holds settings, not data: point to data files "
                              "from it")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    if path.suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where} is not valid TOML: {_one_line(str(exc))}") from None
        except RecursionError:
            raise ConfigError(_too_deep(where)) from None
    else:
        try:
            data = _load_yaml(text, where)
        except RecursionError:
            raise ConfigError(_too_deep(where)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings at the top, "
                          f"got {type(data).__name__}")
    return data


#: The largest config file read (bytes): settings, never data.
MAX_CONFIG_BYTES = 1 << 20


def _too_deep(where: str) -> str:
    return (f"{where} nests arrays or tables too deeply to be read (thousands of levels); "
            "settings nest a few levels at most: flatten it")


def _load_yaml(text: str, where: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load's loader, refusing aliases (an alias bomb expands exponentially)."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(f"{where} line {mark.line + 1}: YAML aliases (*name) are not "
                                  "accepted; write the value out in full")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where} is not valid YAML{at}: {_one_line(problem)}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())
