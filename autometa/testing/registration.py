"""A plugin's hooks and registrations checked the way the host loads them: :func:`check_plugin`.

The host (:mod:`autometa.plugins`) loads a broken plugin without complaint in normal mode:
it lists it as broken and goes on, which suits users but hides an author's mistakes. This
check loads the plugin in a fresh, strict host and turns each mistake into an
``AssertionError`` that names the plugin, the hook or registration at fault and its file and
line: an unknown or mis-signed hook, a registration hook that raises, an import of autometa
beyond its public API (in any file of the plugin's package), a factory registered
as an object instead of a lazy ``"module:attr"`` string, a string that does not load, a
class that is not a subclass of its kind's contract, a declared space that fails
:func:`~autometa.testing.check_space`, and, in a fresh interpreter, a module that imports
torch while it is imported or registers (``autometa plugins`` and ``--help`` would pay for
it on every run).

One mistake is a warning (:class:`NameClashWarning`), not a failure: taking a name that
one of autometa's own plugins has (an entry point ``mlp``, a meta-algorithm ``maml``). The
plugin works alone, but autometa's own plugins are installed with it, so next to them
neither is usable until a user disables one.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, NoReturn

import pluggy

from autometa import hookspecs
from autometa.errors import PluginError, closest
from autometa.plugins import (
    ENTRY_POINT_GROUP,
    KINDS,
    PluginHost,
    PluginInfo,
    Registration,
    create_host,
    first_party,
)
from autometa.testing.locate import located, position, shown

__all__ = ["NameClashWarning", "check_plugin"]

#: Seconds the fresh interpreter of the torch check may take (it imports autometa only).
PROBE_TIMEOUT = 120


class NameClashWarning(UserWarning):
    """:func:`check_plugin` found a name that one of autometa's own plugins has: an entry
    point, or an entry of the same kind. Installed together (always: they come with
    autometa), neither is usable until a user disables one; rename the plugin's.
    ``-W error::autometa.testing.NameClashWarning`` makes it a failure."""


def _contracts() -> dict[str, type]:
    """Kind -> the base class its factories must subclass; other kinds only need a callable."""
    from autometa.algorithm import MetaAlgorithm
    from autometa.source_model import SourceModel
    from autometa.task import Task

    return {"task": Task, "source": SourceModel, "algorithm": MetaAlgorithm}


def _label(plugin: object, name: str) -> str:
    where = position(plugin if isinstance(plugin, ModuleType) else type(plugin))
    if isinstance(plugin, ModuleType):
        return f"plugin {name!r} ({plugin.__name__}, {where})" if where else \
            f"plugin {name!r} ({plugin.__name__})"
    return f"plugin {name!r}"


def _fail(message: str) -> NoReturn:
    __tracebackhide__ = True
    raise AssertionError(message)


def _hook_impls(plugin: object) -> dict[str, tuple[str, Any, tuple[str, ...]]]:
    """``{hook name: (attribute, function, argument names)}`` as pluggy finds them."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    found = {}
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None or opts.get("optionalhook"):
            continue
        function = getattr(plugin, attr)
        impl = pluggy.HookImpl(plugin, "probe", function, opts)
        found[opts.get("specname") or attr] = (attr, function, tuple(impl.argnames))
    return found


def _specs() -> dict[str, tuple[str, ...]]:
    """``{hook name: argument names}`` of every specification in :mod:`autometa.hookspecs`."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return {name: tuple(caller.spec.argnames) for name, caller in vars(pm.hook).items()
            if not name.startswith("_") and caller.spec is not None}


def _check_hooks(plugin: object, label: str) -> dict[str, tuple[str, Any, tuple[str, ...]]]:
    __tracebackhide__ = True
    specs = _specs()
    impls = _hook_impls(plugin)
    for hook, (attr, function, argnames) in impls.items():
        at = position(function)
        where = f"{attr} ({at})" if at else attr
        if hook not in specs:
            _fail(f"{label}: hook {where} matches no specification{closest(hook, specs)}; "
                  f"hooks are {', '.join(sorted(specs))}")
        extra = [a for a in argnames if a not in specs[hook]]
        if extra:
            _fail(f"{label}: hook {where} takes {', '.join(map(repr, extra))}, which "
                  f"{hook} does not pass; it passes {', '.join(specs[hook])} (any subset, "
                  "by name)")
    return impls


def _raised_in(exc: BaseException, impls: dict[str, tuple[str, Any, tuple[str, ...]]]
               ) -> str:
    """`` in hook register_tasks (file:line)`` if the error came from one of the plugin's
    hooks (the innermost frame that ran a hook's code), else ``""``."""
    codes = {getattr(inspect.unwrap(f), "__code__", None): attr
             for attr, f, _ in impls.values()}
    tb, hook = (exc.__cause__ or exc).__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            hook = (codes[tb.tb_frame.f_code], tb.tb_lineno, tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if hook is None:
        return ""
    attr, line, path = hook
    return f" (its hook {attr} raised at {shown(path)}:{line})"


def _lazy_path(factory: Any) -> str:
    module = getattr(factory, "__module__", None) or "pkg.module"
    qualname = getattr(factory, "__qualname__", None) or "Class"
    return f"{module}:{qualname}"


def _check_registration(reg: Registration, hook: str) -> None:
    __tracebackhide__ = True
    what = f"{KINDS[reg.kind][1]} {reg.name!r} of plugin {reg.plugin!r} ({hook})"
    if not isinstance(reg.factory, str):
        _fail(f"{what} is registered as the object {reg.factory!r}; register "
              f"\"{_lazy_path(reg.factory)}\" so that `autometa plugins` and `--help` import "
              "nothing heavy")
    try:
        obj = reg.load()
    except PluginError as exc:
        raise AssertionError(f"{what} does not load: {exc}") from exc
    contract = _contracts().get(reg.kind)
    if contract is None:
        if not callable(obj):
            _fail(f"{what}: {reg.factory!r} is a {type(obj).__name__}, not a callable")
        return
    if not (inspect.isclass(obj) and issubclass(obj, contract)):
        shown = located(obj) if inspect.isclass(obj) else repr(obj)
        _fail(f"{what}: {reg.factory!r} is {shown}, not a subclass of "
              f"autometa.{contract.__name__}")
    if inspect.isabstract(obj):
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        _fail(f"{located(obj)}: registered as {what} but abstract: implement "
              f"{', '.join(missing)}")
    try:
        space = reg.declared()
    except PluginError as exc:
        raise AssertionError(f"{what}: {exc}") from exc
    from autometa.testing.checks import check_space

    check_space(obj, space)


def check_plugin(plugin: object, *, name: str | None = None) -> PluginInfo:
    """Check a plugin module (or object) as the host loads it; returns what it registered.

    ``name`` is its entry-point name (default: the module's last dotted part). Fails when a
    hook name matches no specification or asks for an argument its hook does not pass, a
    registration hook raises, the plugin registers nothing and implements no lifecycle
    hook, a factory is not a ``"module:attr"`` string, does not load, is not a subclass of
    its kind's contract (task, source model, meta-algorithm; the other kinds must load a
    callable), or declares a space :func:`~autometa.testing.check_space` rejects, or a file
    of the plugin's package imports autometa beyond its public API. For an
    importable module, also imports it and runs its registration in a fresh interpreter:
    fails if that imported torch. Warns (:class:`NameClashWarning`) when the entry-point name
    or an entry's kind and name is one of autometa's own plugins'.

    Raises:
        AssertionError: naming the plugin, the hook or registration and its file:line.
    """
    __tracebackhide__ = True
    if name is None:
        name = plugin.__name__.rpartition(".")[2] if isinstance(plugin, ModuleType) \
            else "plugin"
    label = _label(plugin, name)
    impls = _check_hooks(plugin, label)
    try:
        host = create_host(entry_points=False, strict=True, disabled=(), plugins={name: plugin})
    except PluginError as exc:
        reason = str(exc).removeprefix(f"plugin {name!r} is broken: ")
        raise AssertionError(f"{label} is broken{_raised_in(exc, impls)}: {reason}") from exc
    info = host.plugins[name]
    lifecycle = [h for h in impls if not h.startswith("register_")]
    if not info.provides and not lifecycle:
        hooks = ", ".join(hook for hook, _ in KINDS.values())
        _fail(f"{label} registers nothing and implements no lifecycle hook; implement one of "
              f"{hooks} (see autometa.hookspecs)")
    for reg in info.provides:
        hook, _ = KINDS[reg.kind]
        attr, function, _ = impls[hook]
        at = position(function)
        _check_registration(reg, f"{attr}, {at}" if at else attr)
    _warn_first_party_names(plugin, name, label, info, impls)
    if isinstance(plugin, ModuleType):
        _check_imports(plugin, label)
    module = _importable(plugin)
    if module is not None:
        _check_no_torch(module, name, label)
    return info


def _first_party_plugins() -> list[PluginInfo]:
    """autometa's own plugins as installed (the entry points of its distribution), each
    loaded, as the host loads it, into a host of their own: what they are named and
    register."""
    host = PluginHost()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        if dist is None or not first_party(dist.metadata["Name"]):
            continue
        try:
            module = ep.load()
        except Exception:  # its own check fails; nothing to compare with here
            continue
        host.add_plugin(module, ep.name, distribution=dist.metadata["Name"],
                        version=dist.version)
    return [info for info in host.plugins.values() if info.status == "ok"]


def _warn_first_party_names(plugin: object, name: str, label: str, info: PluginInfo,
                            impls: dict[str, tuple[str, Any, tuple[str, ...]]]) -> None:
    """A :class:`NameClashWarning` for the entry-point name and for each entry that one of
    autometa's own plugins has (nothing for autometa's own plugins themselves)."""
    from autometa.testing.imports import FIRST_PARTY_PLUGINS

    if isinstance(plugin, ModuleType) and \
            plugin.__name__.partition(".")[0] == FIRST_PARTY_PLUGINS:
        return
    owned = _first_party_plugins()
    for own in owned:
        if own.name == name:
            warnings.warn(
                f"{label}: its entry-point name {name!r} is that of autometa's first-party "
                f"plugin {own.name!r} ({own.distribution} {own.version}), which every install "
                "of autometa has: neither is loaded until a user disables one; rename your "
                "entry point (pyproject.toml, [project.entry-points.autometa])",
                NameClashWarning, stacklevel=3)
    theirs = {(reg.kind, reg.name): reg for own in owned for reg in own.provides}
    for reg in info.provides:
        same = theirs.get((reg.kind, reg.name))
        if same is None:
            continue
        attr, function, _ = impls[KINDS[reg.kind][0]]
        at = position(function)
        kind = KINDS[reg.kind][1]
        warnings.warn(
            f"{kind} {reg.name!r} of plugin {reg.plugin!r} ({f'{attr}, {at}' if at else attr}) "
            f"has the name of autometa's first-party {kind} {same.name!r} (plugin "
            f"{same.plugin!r}, {same.distribution} {same.version}), which every install of "
            "autometa has: both are unusable until a user disables one; register yours under "
            "a name of its own",
            NameClashWarning, stacklevel=3)


def _check_imports(plugin: ModuleType, label: str) -> None:
    """Fail on an import of autometa beyond its public API in the plugin's package."""
    __tracebackhide__ = True
    from pathlib import Path

    from autometa.testing.imports import FIRST_PARTY_PLUGINS, import_problems

    roots = [Path(p) for p in getattr(plugin, "__path__", [])]  # a package: all its files
    single = getattr(plugin, "__file__", None)
    files = sorted(f for r in roots for f in r.rglob("*.py")) if roots else \
        [Path(single)] if single else []
    parts = plugin.__name__.split(".")
    own = ".".join(parts[:2]) if parts[0] == FIRST_PARTY_PLUGINS else None
    problems = [p for f in files for p in import_problems(f, shown=shown(str(f)), own=own)]
    if problems:
        _fail(f"{label} imports beyond autometa's public API (README, Public API):\n"
              + "\n".join(problems))


def _importable(plugin: object) -> str | None:
    """The name of a module a fresh interpreter can import by that name (not ``__main__``,
    not one built in memory), else None."""
    if not isinstance(plugin, ModuleType) or plugin.__name__ == "__main__":
        return None
    try:
        found = importlib.util.find_spec(plugin.__name__) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a __spec__
        return None
    return plugin.__name__ if found else None


# Run in a fresh interpreter: import the plugin, then register it, and report whether (and
# from where) torch got imported. A finder first on sys.meta_path sees the first
# `import torch` and records the stack of the code that asked for it.
_PROBE = r"""
import importlib, json, sys, traceback
sys.path[:] = json.loads(sys.argv[1])
module_name, plugin_name = sys.argv[2], sys.argv[3]
from autometa.plugins import create_host
state = {"stage": "import", "already": "torch" in sys.modules, "stack": None}

class Spy:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch" and state["stack"] is None:
            state["stack"] = [
                (f.filename, f.lineno, f.line or "") for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<") and "importlib" not in f.filename]
            state["at"] = state["stage"]
        return None

sys.meta_path.insert(0, Spy())
try:
    module = importlib.import_module(module_name)
except ModuleNotFoundError as exc:
    if module_name == exc.name or module_name.startswith(f"{exc.name}."):
        state["importable"] = False
        print(json.dumps(state)); sys.exit(0)
    raise
state["stage"] = "registration"
create_host(entry_points=False, strict=True, disabled=(), plugins={plugin_name: module})
state["torch"] = "torch" in sys.modules
print(json.dumps(state))
"""


def _importers(stack: list[list[Any]]) -> list[str]:
    """``file:line `code``` of each frame from the plugin's code to the ``import torch``.

    The probe's and the host's frames above the plugin's first one are left out; a long
    chain keeps its two ends.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # autometa/
    first = next((i for i, (path, _, _) in enumerate(stack)
                  if not os.path.abspath(path).startswith(package + os.sep)), 0)
    frames = [f"{shown(path)}:{line} `{code.strip()}`" for path, line, code in stack[first:]]
    return frames if len(frames) <= 6 else [*frames[:2], "...", *frames[-3:]]


def _check_no_torch(module: str, name: str, label: str) -> None:
    __tracebackhide__ = True
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMETA_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([p for p in sys.path if isinstance(p, str)]),
         module, name],
        capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        _fail(f"{label}: importing {module!r} and registering it in a fresh interpreter "
              f"failed (exit {done.returncode}):\n{tail}")
    state = json.loads(done.stdout.strip().splitlines()[-1])
    if state.get("importable") is False or not state.get("torch"):
        return
    if state["already"]:
        _fail(f"{label}: torch was imported before the plugin, when Python or autometa "
              "started (a sitecustomize or .pth file?); the torch check cannot run")
    chain = " -> ".join(_importers(state["stack"] or []))
    when = "importing" if state.get("at") == "import" else "registering"
    _fail(f"{label}: importing {module!r} or registering it imported torch ({when} it: "
          f"{chain or 'importer not found'}); move torch imports into the module named by "
          "the 'module:attr' string, so that `autometa plugins` and `--help` import nothing "
          "heavy")
