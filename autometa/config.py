"""Search configuration: one dataclass, validated once at the edge.

The same names are used everywhere: keyword arguments of :func:`autometa.search`, keys
of a TOML/YAML config file, and (with dashes) flags of ``autometa run``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autometa.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Embedded, on-disk storage in the working directory: a search survives a crash.
DEFAULT_STORAGE = "sqlite:///autometa.db"


@dataclass
class SearchConfig:
    """Everything that defines a search. Unknown keys and bad values raise ConfigError."""

    task: str  # task plugin name, e.g. "sinusoid"
    task_params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task
    algorithms: list[str] = field(default_factory=list)  # [] = every compatible algorithm
    sources: list[str] = field(default_factory=list)  # [] = every compatible source model
    # {plugin: {hyperparameter: value | [choices] | {low, high}}}: fix, restrict or narrow
    algorithm_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_trials: int | None = 20  # trials to finish in this study (counting earlier runs)
    timeout: float | None = None  # stop starting trials after this many seconds
    meta_steps: int = 500  # meta-training budget of one trial
    eval_every: int = 100  # meta-val evaluation (and pruning check) interval, in meta-steps
    seed: int = 0  # seeds the sampler, the task's data and every trial
    study_name: str | None = None  # default: "<task>-seed<seed>"
    storage: str = DEFAULT_STORAGE  # any Optuna storage URL
    artifacts: str = "autometa-artifacts"  # directory for trained trial states
    device: str = "cpu"  # torch device of every trial, e.g. "cuda:0"
    threads: int | None = None  # torch CPU threads during the search (None: torch's default)
    top_k: int = 3  # best trials (on meta-val) evaluated on meta-test
    pruner: str = "median"  # "median" or "none"

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
        """Read a ``.toml`` or ``.yaml``/``.yml`` file; ``overrides`` win over its keys."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in {".yaml", ".yml"}:
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                raise ConfigError(
                    f"config file {str(path)!r}: unknown format {path.suffix!r}; "
                    "use .toml, .yaml or .yml"
                )
        except (tomllib.TOMLDecodeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"config file {str(path)!r} is not valid: {exc}") from exc
        except Exception as exc:  # yaml.YAMLError
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a table of settings")
        return cls.from_dict({**data, **overrides}, where=str(path))

    # -- derived -------------------------------------------------------------------------
    @property
    def study(self) -> str:
        """The study name in the storage."""
        return self.study_name or f"{self.task}-seed{self.seed}"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed study must share with the one it continues."""
        keep = {"task", "task_params", "algorithms", "sources", "algorithm_params",
                "source_params", "meta_steps", "eval_every", "seed", "pruner"}
        return {k: v for k, v in asdict(self).items() if k in keep}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        _expect(self.task, str, "task", "a task plugin name")
        _expect(self.task_params, dict, "task_params", "a table of task parameters")
        for key in ("algorithms", "sources"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(self, key, value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}: expected a list of plugin names, got {value!r}")
        for key in ("algorithm_params", "source_params"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(
                    f"{key}: expected a table per plugin, e.g. {{maml = {{inner_steps = 1}}}}, "
                    f"got {value!r}"
                )
        if self.n_trials is not None:
            _positive_int(self.n_trials, "n_trials")
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) \
                    or self.timeout <= 0:
                raise ConfigError(f"timeout: expected a positive number of seconds, "
                                  f"got {self.timeout!r}")
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("set n_trials, timeout or both: a search needs a budget")
        _positive_int(self.meta_steps, "meta_steps")
        _positive_int(self.eval_every, "eval_every")
        _positive_int(self.top_k, "top_k")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {self.seed!r}")
        if self.study_name is not None:
            _expect(self.study_name, str, "study_name", "a name")
        _expect(self.storage, str, "storage", "an Optuna storage URL such as sqlite:///x.db")
        _expect(self.artifacts, str, "artifacts", "a directory path")
        _expect(self.device, str, "device", "a torch device such as 'cpu' or 'cuda:0'")
        if self.pruner not in {"median", "none"}:
            raise ConfigError(f"pruner: expected 'median' or 'none', got {self.pruner!r}")


def _expect(value: Any, kind: type, key: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is str and not value):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _positive_int(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
