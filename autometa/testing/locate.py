"""Where plugin code lives, for messages: ``MAML.meta_step (plugins/maml/algorithm.py:88)``.

A failing check names the class it checked and, when it knows which method broke the
contract, that method's own file and line, so that the message leads to the code to fix.
"""

from __future__ import annotations

import inspect
import os
from typing import Any


def shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as given."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith(os.pardir) else relative


def position(obj: Any) -> str | None:
    """``file:line`` where ``obj`` (a class, function, method or module) is defined, or None."""
    try:
        obj = inspect.unwrap(obj)
        path = inspect.getsourcefile(obj)
        _, line = inspect.getsourcelines(obj)
    except (TypeError, OSError, ValueError):  # built in, made by exec, source not shipped
        return None
    if path is None:
        return None
    return f"{shown(path)}:{max(line, 1)}"  # a module's lines start at 0


def _function(attr: Any) -> Any:
    """The function behind a class attribute: a property's getter, a classmethod's function."""
    if isinstance(attr, property):
        return attr.fget
    return getattr(attr, "__func__", attr)


def located(cls: type, method: str | None = None) -> str:
    """``Cls (file:line)``, or ``Cls.method (file:line)`` pointing at the method's definition.

    An inherited method points at the base class's code, which is what ran, and also says
    where ``cls`` is: ``Mine.meta_step (base.py:40, inherited from Base; Mine at mine.py:7)``.
    """
    where = position(cls)
    if method is None:
        return f"{cls.__name__} ({where})" if where else cls.__name__
    label = f"{cls.__name__}.{method}"
    owner = next((c for c in inspect.getmro(cls) if method in vars(c)), cls)
    at = position(_function(vars(owner)[method])) if method in vars(owner) else None
    if at is None:
        return f"{label} ({cls.__name__} at {where})" if where else label
    if owner is cls:
        return f"{label} ({at})"
    mine = f"; {cls.__name__} at {where}" if where else ""
    return f"{label} ({at}, inherited from {owner.__name__}{mine})"
