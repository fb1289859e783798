"""The plugin host: discovers plugins through entry points and collects their registrations.

Every plugin, first- or third-party, arrives the same way: an entry point in the
``autometa`` group names a module holding hook implementations (see
:mod:`autometa.hookspecs`). Each one is loaded in isolation: a plugin whose import,
hook signature or registration hook fails is recorded as broken (with its error) and
skipped, unless strict mode re-raises.

Environment:
    AUTOMETA_STRICT_PLUGINS=1   re-raise the first plugin error instead of skipping.
    AUTOMETA_DISABLE_PLUGINS=a,b  block plugins by name (the entry-point name).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

import pluggy

from autometa import hookspecs
from autometa.errors import PluginError, unknown

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "autometa"

Kind = Literal["task", "source", "algorithm"]

#: Plugin kind -> (registration hook, human name).
KINDS: Mapping[Kind, tuple[str, str]] = {
    "task": ("register_tasks", "task"),
    "source": ("register_source_models", "source model"),
    "algorithm": ("register_meta_algorithms", "meta-algorithm"),
}


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

    def load(self) -> Any:
        """Return the factory, importing it if it was registered as ``"module:attr"``."""
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"{KINDS[self.kind][1]} {self.name!r} from plugin {self.origin} cannot be "
                f"loaded from {self.factory!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return obj


@dataclass
class PluginInfo:
    """A plugin as ``autometa plugins`` shows it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    status: Literal["ok", "broken", "disabled"] = "ok"
    error: str | None = None
    provides: list[Registration] = field(default_factory=list)


class PluginHost:
    """Holds the plugin manager, the plugins seen and what they registered.

    Build one with :func:`create_host`; tests build their own, there is no global.
    """

    def __init__(self, *, strict: bool = False, disabled: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: dict[Kind, dict[str, Registration]] = {k: {} for k in KINDS}
        self._clashes: dict[tuple[Kind, str], list[Registration]] = {}
        for name in disabled:
            self.pm.set_blocked(name)
            self.plugins[name] = PluginInfo(name, status="disabled")

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every installed plugin of ``group``, each in isolation."""
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            if self.pm.is_blocked(ep.name):
                info = self.plugins[ep.name]
                info.distribution, info.version = _dist(ep)
                continue
            dist, version = _dist(ep)
            try:
                module = ep.load()
            except Exception as exc:
                self._broken(PluginInfo(ep.name, dist, version), exc, "import failed")
                continue
            self.add_plugin(module, ep.name, distribution=dist, version=version)

    def add_plugin(
        self,
        plugin: object,
        name: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginInfo:
        """Register one plugin object and collect its registrations.

        On failure the plugin is unregistered and listed as broken (strict mode re-raises).
        """
        info = PluginInfo(name, distribution, version)
        if self.pm.is_blocked(name):
            return self.plugins[name]
        if name in self.plugins:
            other = self.plugins[name]
            raise PluginError(
                f"two plugins are named {name!r}: {other.distribution or 'in-process'} and "
                f"{distribution or 'in-process'}; rename one entry point"
            )
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()  # a misspelled hook name fails here
        except Exception as exc:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self._broken(info, exc, "invalid hooks")
            return info
        collected: list[Registration] = []
        try:
            for kind, (hook_name, _) in KINDS.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == name:
                        impl.function(register=self._registrar(kind, info, collected))
        except Exception as exc:
            self.pm.unregister(name=name)
            self._broken(info, exc, "registration hook failed")
            return info
        for reg in collected:
            self._add(reg)
        info.provides = collected
        self.plugins[name] = info
        return info

    def _registrar(self, kind: Kind, info: PluginInfo, out: list[Registration]) -> Any:
        def register(name: str, factory: Any, *, description: str = "") -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {info.name!r} registered a {kind} with no name")
            if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
                raise PluginError(
                    f"plugin {info.name!r} registered {kind} {name!r} with factory "
                    f"{factory!r}; expected a class or a 'module:attr' string"
                )
            out.append(
                Registration(kind, name, factory, info.name, info.distribution, info.version,
                             description)
            )

        return register

    def _add(self, reg: Registration) -> None:
        table = self._registry[reg.kind]
        key = (reg.kind, reg.name)
        if key in self._clashes:
            self._clashes[key].append(reg)
            return
        if reg.name in table:
            first = table.pop(reg.name)
            self._clashes[key] = [first, reg]
            message = self._clash_message(reg.kind, reg.name)
            log.error(message)
            if self.strict:
                raise PluginError(message)
            return
        table[reg.name] = reg

    def _clash_message(self, kind: Kind, name: str) -> str:
        regs = self._clashes[(kind, name)]
        who = " and ".join(r.origin for r in regs)
        return (
            f"{KINDS[kind][1]} {name!r} is registered by {who}; uninstall or disable one "
            "(AUTOMETA_DISABLE_PLUGINS=name)"
        )

    def _broken(self, info: PluginInfo, exc: BaseException, what: str) -> None:
        info.status = "broken"
        info.error = f"{what}: {type(exc).__name__}: {exc}"
        self.plugins[info.name] = info
        log.warning("plugin %r is broken and skipped (%s)", info.name, info.error)
        if self.strict:
            raise PluginError(f"plugin {info.name!r} is broken: {info.error}") from exc

    # -- queries -------------------------------------------------------------------------
    def names(self, kind: Kind) -> list[str]:
        """Sorted names available for ``kind`` (clashing names excluded)."""
        return sorted(self._registry[kind])

    def get(self, kind: Kind, name: str) -> Registration:
        """The registration of ``name``; a clear :class:`PluginError` if unknown or clashing."""
        if (kind, name) in self._clashes:
            raise PluginError(self._clash_message(kind, name))
        try:
            return self._registry[kind][name]
        except KeyError:
            raise PluginError(unknown(KINDS[kind][1], name, self._registry[kind])) from None

    def registrations(self) -> list[Registration]:
        """Every usable registration, by kind then name."""
        return [self._registry[k][n] for k in KINDS for n in self.names(k)]

    def clashes(self) -> list[str]:
        """One message per name registered by more than one plugin."""
        return [self._clash_message(k, n) for k, n in self._clashes]

    # -- lifecycle -----------------------------------------------------------------------
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin; one that raises is logged, not fatal."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except Exception:
                if self.strict:
                    raise
                log.exception("plugin %r failed in hook %s", impl.plugin_name, hook_name)


def _dist(ep: Any) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def create_host(
    *,
    entry_points: bool = True,
    strict: bool | None = None,
    disabled: Iterable[str] | None = None,
    plugins: Mapping[str, object] | None = None,
) -> PluginHost:
    """Build a fresh :class:`PluginHost`.

    Args:
        entry_points: load the plugins installed under the ``autometa`` entry-point group.
        strict: re-raise plugin errors; defaults to ``AUTOMETA_STRICT_PLUGINS``.
        disabled: plugin names to block; defaults to ``AUTOMETA_DISABLE_PLUGINS``.
        plugins: extra in-process plugins, ``{name: module_or_object}`` (tests, notebooks).
    """
    if strict is None:
        strict = _env_flag("AUTOMETA_STRICT_PLUGINS")
    if disabled is None:
        raw = os.environ.get("AUTOMETA_DISABLE_PLUGINS", "")
        disabled = [n.strip() for n in raw.split(",") if n.strip()]
    host = PluginHost(strict=strict, disabled=disabled)
    if entry_points:
        host.load_entry_points()
    for name, obj in (plugins or {}).items():
        host.add_plugin(obj, name)
    return host
