"""What plugins register: the kinds of entries and one registration (:class:`Registration`).

A registration hook (:mod:`autometa.hookspecs`) calls ``register(name, factory)``; the
host records a :class:`Registration` per call: its kind, name, factory (a class or a lazy
``"module:attr"`` string) and the plugin and distribution that made it. Every call of
plugin code through a registration goes through :meth:`Registration.guard`, so that a
plugin's failure is one line naming it. :mod:`autometa.plugins` re-exports these names.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from autometa.errors import AutometaError, PluginError

Kind = Literal["task", "source", "algorithm", "pruner", "sampler", "report_format", "command"]

#: Plugin kind -> (registration hook, human name). The first three are the plugin kinds a
#: search combines; the others extend the engine (see :mod:`autometa.hookspecs`).
KINDS: Mapping[Kind, tuple[str, str]] = {
    "task": ("register_tasks", "task"),
    "source": ("register_source_models", "source model"),
    "algorithm": ("register_meta_algorithms", "meta-algorithm"),
    "pruner": ("register_pruners", "pruner"),
    "sampler": ("register_samplers", "sampler"),
    "report_format": ("register_report_formats", "report format"),
    "command": ("register_commands", "command"),
}
#: The kinds whose entries declare settings (a task's ``params``, a ``search_space()``).
DECLARING: frozenset[Kind] = frozenset({"task", "source", "algorithm"})

#: Longest error text kept for a listing cell; a plugin's message can be pages long.
MAX_ERROR = 500


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line (at most :data:`MAX_ERROR` characters)."""
    if isinstance(exc, SystemExit):
        text = f"SystemExit: the plugin called sys.exit({exc.code!r})"
    elif isinstance(exc, AutometaError):
        text = str(exc)  # already written for users
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


@dataclass(frozen=True)
class Registration:
    """One registered factory and where it came from."""

    kind: Kind
    name: str
    factory: Any  # a class/callable, or a "module:attr" string imported on first use
    plugin: str
    distribution: str | None = None
    version: str | None = None
    description: str = ""

    @property
    def origin(self) -> str:
        """``plugin (distribution version)``, for messages and listings."""
        if self.distribution:
            return f"{self.plugin!r} ({self.distribution} {self.version})"
        return repr(self.plugin)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run plugin code; any failure but Ctrl-C becomes a one-line :class:`PluginError`.

        ``with reg.guard("raised in incompatibility()"): reason = cls.incompatibility(task)``
        raises ``PluginError("meta-algorithm 'x' from plugin 'p' raised in
        incompatibility(): ValueError: ...")``; autometa's own errors (a ``PluginError``, or
        a ``ConfigError``/``DataError`` written for users) pass through unchanged.
        """
        try:
            yield
        except (KeyboardInterrupt, AutometaError):
            raise
        except BaseException as exc:  # SystemExit too: a plugin never ends the host
            raise PluginError(
                f"{KINDS[self.kind][1]} {self.name!r} from plugin {self.origin} {what}: "
                f"{describe_error(exc)}"
            ) from exc

    def load(self) -> Any:
        """Return the factory, importing it if it was registered as ``"module:attr"``.

        Raises:
            PluginError: the import or attribute look-up failed in any way (``sys.exit()``
                at import included), naming the registration, its plugin and the path.
        """
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        with self.guard(f"cannot be loaded from {self.factory!r}"):
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        return obj

    def declared(self, task: Any = None) -> Mapping[str, Any]:
        """What the entry declares: a task's ``params``, else its ``search_space()``
        (nothing for the kinds that extend the engine: a pruner, a report format...).

        Args:
            task: the search's task; passed to a ``search_space(task=...)`` that accepts it.

        Raises:
            PluginError: loading failed, the call failed, or it returned no mapping.
        """
        obj = self.load()
        if self.kind not in DECLARING:
            return {}
        call = "params" if self.kind == "task" else "search_space()"
        with self.guard(f"raised in {call}"):
            if self.kind == "task":
                space = obj.params
            else:
                takes_task = task is not None and (
                    "task" in inspect.signature(obj.search_space).parameters)
                space = obj.search_space(task=task) if takes_task else obj.search_space()
        if not isinstance(space, Mapping):
            raise PluginError(
                f"{KINDS[self.kind][1]} {self.name!r} from plugin {self.origin}: {call} is a "
                f"{type(space).__name__}; expected a dict of parameter name -> Float, Int, "
                "Categorical or fixed value"
            )
        return space
