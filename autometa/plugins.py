"""The plugin host: discovers plugins through entry points and collects their registrations.

Every plugin, first- or third-party, arrives the same way: an entry point in the
``autometa`` group names a module holding hook implementations (see
:mod:`autometa.hookspecs`). Each one is loaded in isolation: a plugin whose import, hook
names, hook signatures or registration hooks fail (any exception, ``sys.exit()``
included; only Ctrl-C gets through) is recorded as broken, with its error on one line,
and skipped, unless strict mode re-raises. A hook name that matches no specification is
reported with the closest one (``register_task`` -> ``register_tasks``).

Two installed distributions with an entry point of the same name (say ``mlp``) are both
listed as conflicting and neither is used: what they register fails with a message naming
both distributions until one is disabled; every other plugin keeps working. Where one of
two clashing plugins is first-party (of :data:`DISTRIBUTION`), the message says how to
disable the third-party one, never autometa's own.

A registered factory is only imported when used: :meth:`Registration.load` and
:meth:`PluginHost.check` turn whatever goes wrong there into :class:`PluginError`, and
:meth:`Registration.guard` does the same around any other call of plugin code.

Environment:
    AUTOMETA_STRICT_PLUGINS=1   re-raise the first plugin error instead of skipping.
    AUTOMETA_DISABLE_PLUGINS=a,b  block plugins by entry-point name (every distribution's);
        ``dist:name`` blocks only distribution ``dist``'s entry point ``name``, e.g.
        ``AUTOMETA_DISABLE_PLUGINS=fakedist:mlp`` keeps autometa's own ``mlp``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

import pluggy

from autometa import hookspecs
from autometa.errors import ConfigError, PluginError, closest, unknown

# Re-exported: the host's vocabulary (what is registered, and how) lives in its own module.
from autometa.registration import (  # noqa: F401
    DECLARING,
    KINDS,
    MAX_ERROR,
    Kind,
    Registration,
    describe_error,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "autometa"
#: autometa's own distribution, which also holds the first-party plugins: ``pip install
#: autometa-ml`` (on the package index, ``autometa`` is another project). The import
#: package, the command and the entry-point group are ``autometa``.
DISTRIBUTION = "autometa-ml"


@dataclass
class PluginInfo:
    """A plugin as ``autometa plugins`` shows it.

    ``status`` is ``conflict`` when another distribution has an entry point of the same
    name: neither is used until one is disabled (``error`` says how).
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    status: Literal["ok", "broken", "disabled", "conflict"] = "ok"
    error: str | None = None
    provides: list[Registration] = field(default_factory=list)


class _Broken(Exception):
    """A plugin failed at one stage of loading (internal)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {describe_error(cause)}")
        self.cause = cause


class PluginHost:
    """Holds the plugin manager, the plugins seen and what they registered.

    Build one with :func:`create_host`; tests build their own, there is no global.
    ``plugins`` is keyed by entry-point name, or ``"distribution:name"`` where several
    distributions have an entry point of that name.
    """

    def __init__(self, *, strict: bool = False, disabled: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: dict[Kind, dict[str, Registration]] = {k: {} for k in KINDS}
        self._clashes: dict[tuple[Kind, str], list[Registration]] = {}
        # (kind, name) registered by a conflicting entry point -> the conflict's message
        self._conflicts: dict[tuple[Kind, str], str] = {}
        self._conflict_messages: list[str] = []
        self._disabled_in: set[tuple[str, str]] = set()  # (normalised distribution, name)
        for entry in disabled:
            dist, sep, name = entry.partition(":")
            if sep:
                self._disabled_in.add((_normalise(dist), name))
                continue
            self.pm.set_blocked(entry)
            self.plugins[entry] = PluginInfo(entry, status="disabled")

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every installed plugin of ``group``, each in isolation."""
        by_name: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=group):
            by_name.setdefault(ep.name, []).append(ep)
        for name in sorted(by_name):
            eps = sorted(by_name[name], key=lambda e: _dist(e)[0] or "")
            shared = len(eps) > 1
            if shared and name in self.plugins:  # a plain name blocks every distribution's
                del self.plugins[name]
            active: list[tuple[EntryPoint, str | None, str | None]] = []
            for ep in eps:
                dist, version = _dist(ep)
                if self.pm.is_blocked(name) or (_normalise(dist or ""), name) in self._disabled_in:
                    key = f"{dist}:{name}" if shared else name
                    self.plugins[key] = PluginInfo(name, dist, version, status="disabled")
                else:
                    active.append((ep, dist, version))
            if len(active) == 1:
                ep, dist, version = active[0]
                try:
                    module = _import(ep)
                except _Broken as exc:
                    self._broken(PluginInfo(name, dist, version), exc, name)
                    continue
                self.add_plugin(module, name, distribution=dist, version=version)
            elif active:
                self._conflict(name, active)

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

        Raises:
            PluginError: a plugin of this name is already loaded (choose another name).
        """
        info = PluginInfo(name, distribution, version)
        if self.pm.is_blocked(name):
            return self.plugins[name]
        if name in self.plugins:
            other = self.plugins[name]
            raise PluginError(
                f"two plugins are named {name!r}: {other.distribution or 'in-process'} and "
                f"{distribution or 'in-process'}; rename one"
            )
        try:
            collected = self._collect(plugin, name, info)
        except _Broken as exc:
            self._broken(info, exc, name)
            return info
        for reg in collected:
            self._add(reg)
        info.provides = collected
        self.plugins[name] = info
        return info

    def _collect(self, plugin: object, key: str, info: PluginInfo) -> list[Registration]:
        """Register ``plugin`` as ``key``, check its hooks and run its registration hooks.

        Raises:
            _Broken: at the failing stage; the plugin is unregistered again.
        """
        try:
            _check_marked(plugin)
            self.pm.register(plugin, name=key)
            self._check_hook_names(key)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin never ends the host
            self._forget(key)
            raise _Broken("invalid hooks", exc) from exc
        collected: list[Registration] = []
        try:
            for kind, (hook_name, _) in KINDS.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == key:
                        impl.function(register=self._registrar(kind, info, collected))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._forget(key)
            raise _Broken("registration hook failed", exc) from exc
        return collected

    def _check_hook_names(self, key: str) -> None:
        """pluggy's ``check_pending`` for one plugin, with the closest hook name."""
        specs = [n for n, caller in vars(self.pm.hook).items()
                 if not n.startswith("_") and caller.has_spec()]
        for name, caller in vars(self.pm.hook).items():
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin_name == key and not impl.optionalhook:
                    raise PluginError(f"unknown hook {name!r}{closest(name, specs)}; "
                                      f"hooks are {', '.join(sorted(specs))}")

    def _forget(self, key: str) -> None:
        if self.pm.get_plugin(key) is not None:
            self.pm.unregister(name=key)

    def _conflict(self, name: str, eps: list[tuple[EntryPoint, str | None, str | None]]) -> None:
        """Several distributions have entry point ``name``: list each, use none of them."""
        who = ", ".join(f"{dist} {version}" for _, dist, version in eps)
        first, last = eps[0][1], eps[-1][1]
        others = [dist for _, dist, _ in eps if not first_party(dist)]
        if others and any(first_party(dist) for _, dist, _ in eps):  # disable the others
            fix = ("keep autometa's own with AUTOMETA_DISABLE_PLUGINS="
                   + ",".join(f"{dist}:{name}" for dist in others))
        else:
            fix = f"keep one with AUTOMETA_DISABLE_PLUGINS={last}:{name} (or {first}:{name})"
        message = (f"plugin {name!r} is installed by {len(eps)} distributions ({who}); none of "
                   f"them is used: {fix}")
        log.error(message)
        self._conflict_messages.append(message)
        for ep, dist, version in eps:
            key = f"{dist}:{name}"
            info = PluginInfo(name, dist, version, status="conflict", error=message)
            try:  # import it to show what it would provide; its hooks stay unregistered
                info.provides = self._collect(_import(ep), key, info)
                self._forget(key)
            except _Broken as exc:
                info.error = f"{message}; it is also broken: {exc}"
            self.plugins[key] = info
            for reg in info.provides:
                self._conflicts[(reg.kind, reg.name)] = message
        if self.strict:
            raise PluginError(message)

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
        others = list(dict.fromkeys(r.plugin for r in regs if not first_party(r.distribution)))
        if others and any(first_party(r.distribution) for r in regs):  # disable the others
            ones = "one" if len(others) == 1 else "ones"
            return (f"{KINDS[kind][1]} {name!r} is registered by {who}; uninstall or disable "
                    f"the third-party {ones} to keep autometa's own "
                    f"(AUTOMETA_DISABLE_PLUGINS={','.join(others)})")
        return (
            f"{KINDS[kind][1]} {name!r} is registered by {who}; uninstall or disable one "
            f"(AUTOMETA_DISABLE_PLUGINS={regs[-1].plugin})"
        )

    def _broken(self, info: PluginInfo, exc: _Broken, key: str) -> None:
        info.status = "broken"
        info.error = str(exc)
        self.plugins[key] = info
        log.warning("plugin %r is broken and skipped (%s)", info.name, info.error)
        if self.strict:
            raise PluginError(f"plugin {info.name!r} is broken: {info.error}") from exc.cause

    # -- queries -------------------------------------------------------------------------
    def names(self, kind: Kind) -> list[str]:
        """Sorted names available for ``kind`` (clashing and conflicting names excluded)."""
        return sorted(n for n in self._registry[kind] if (kind, n) not in self._conflicts)

    def registered(self, kind: Kind, name: str) -> bool:
        """True if a plugin registers ``name``, usable or not (:meth:`get` says why not)."""
        key = (kind, name)
        return name in self._registry[kind] or key in self._clashes or key in self._conflicts

    def get(self, kind: Kind, name: str) -> Registration:
        """The registration of ``name``.

        Raises:
            PluginError: unknown (listing the known names), registered by two plugins, or
                from an entry point that two distributions share (naming both).
        """
        if (kind, name) in self._conflicts:
            raise PluginError(f"{KINDS[kind][1]} {name!r} is unavailable: "
                              f"{self._conflicts[(kind, name)]}")
        if (kind, name) in self._clashes:
            raise PluginError(self._clash_message(kind, name))
        try:
            return self._registry[kind][name]
        except KeyError:
            raise PluginError(unknown(KINDS[kind][1], name, self.names(kind))) from None

    def check(self, reg: Registration, task: Any = None) -> str | None:
        """Why ``reg`` is unusable, on one line, or None: loads it and asks for its space.

        Imports the factory and calls its ``search_space()`` (``search_space(task=task)``
        when it accepts the task; a task's ``params``), catching every failure but Ctrl-C.
        Whether the entry suits a given task is ``incompatibility()``'s answer, not this.
        """
        try:
            reg.declared(task)
        except PluginError as exc:
            return str(exc)
        return None

    def check_options(self, plugins: Iterable[str]) -> None:
        """Raise :class:`ConfigError` if a plugin given options (``[plugins.NAME]``,
        ``--plugin-option NAME.KEY=VALUE``) is not loaded: options go to a plugin by its
        entry-point name, as ``autometa plugins`` lists it."""
        loaded = sorted(k for k, info in self.plugins.items() if info.status == "ok")
        for name in plugins:
            if name in loaded:
                continue
            owners = sorted({r.plugin for r in self.registrations() if r.name == name})
            if owners:
                raise ConfigError(f"plugins.{name}: options go to a plugin by its own name, "
                                  f"and {name!r} is something plugin {owners[0]!r} registers; "
                                  f"give them as {owners[0]}.KEY=VALUE")
            info = self.plugins.get(name)
            why = f"is {info.status}" if info is not None else "is not installed"
            raise ConfigError(f"plugins.{name}: plugin {name!r} {why}{closest(name, loaded)}; "
                              "options go to a loaded plugin by its name in `autometa plugins`")

    def registrations(self) -> list[Registration]:
        """Every usable registration, by kind then name."""
        return [self._registry[k][n] for k in KINDS for n in self.names(k)]

    def clashes(self) -> list[str]:
        """One message per name that several plugins or distributions claim."""
        return [self._clash_message(k, n) for k, n in self._clashes] + self._conflict_messages

    # -- lifecycle -----------------------------------------------------------------------
    def notify(self, hook_name: str, event: Any,
               options: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin; one that fails is logged, not fatal.

        Args:
            event: an :mod:`autometa.events` dataclass; each plugin receives a copy whose
                ``options`` are its own (``options[<plugin name>]``, else empty).
            options: every plugin's settings, ``{plugin name: {key: value}}``.
            **kwargs: the hook's other (older) arguments.
        """
        import dataclasses

        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            own = dict((options or {}).get(impl.plugin_name, {}))
            values = {**kwargs, "event": dataclasses.replace(event, options=own)}
            try:
                impl.function(**{a: values[a] for a in impl.argnames})
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too: a reporter never ends a search
                if self.strict:
                    raise PluginError(f"plugin {impl.plugin_name!r} failed in hook "
                                      f"{hook_name}: {describe_error(exc)}") from exc
                log.warning("plugin %r failed in hook %s", impl.plugin_name, hook_name,
                            exc_info=exc)


def _check_marked(plugin: object) -> None:
    """Raise :class:`PluginError` for a function named like a hook but not marked with
    ``@autometa.hookimpl``: pluggy skips it silently, and what it would register is then
    "unknown" with no hint why."""
    marker = f"{hookspecs.PROJECT}_impl"
    for name in sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n),
                                                            f"{hookspecs.PROJECT}_spec")):
        function = getattr(plugin, name, None)
        if callable(function) and not hasattr(function, marker) \
                and getattr(function, "__module__", None) != hookspecs.__name__:
            raise PluginError(f"{name}() is not marked as a hook: decorate it with "
                              "@autometa.hookimpl")


def _import(ep: EntryPoint) -> Any:
    """``ep.load()``; any failure but Ctrl-C is raised as :class:`_Broken`."""
    try:
        return ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a plugin never ends the host
        raise _Broken("import failed", exc) from exc


def _dist(ep: Any) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def first_party(distribution: str | None) -> bool:
    """Whether ``distribution`` is autometa's own (:data:`DISTRIBUTION`), any spelling."""
    return distribution is not None and _normalise(distribution) == DISTRIBUTION


def _normalise(distribution: str) -> str:
    """PEP 503 form of a distribution name: ``Fake_Dist`` and ``fake-dist`` are one."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


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
        disabled: plugin names to block, ``name`` or ``distribution:name``; defaults to
            ``AUTOMETA_DISABLE_PLUGINS``.
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
