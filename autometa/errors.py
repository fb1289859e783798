"""Exception families. Each message names the offending value, what was expected and the fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["AutometaError", "ConfigError", "DataError", "PluginError", "closest", "unknown"]


class AutometaError(Exception):
    """Base of every error autometa raises on purpose (the CLI prints these as one line)."""


class ConfigError(AutometaError, ValueError):
    """An invalid configuration key or value."""


class PluginError(AutometaError):
    """A plugin that cannot be found, loaded or used."""


class DataError(AutometaError, ValueError):
    """Data that a task cannot use."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``.

    Case is ignored (``MLP`` → ``'mlp'``); a choice equal to ``name`` but for case wins.
    """
    choices = list(choices)
    by_case = {c.casefold(): c for c in reversed(choices)}
    if name.casefold() in by_case:
        return f" (did you mean {by_case[name.casefold()]!r}?)"
    match = difflib.get_close_matches(name.casefold(), list(by_case), n=1, cutoff=0.5)
    return f" (did you mean {by_case[match[0]]!r}?)" if match else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name: lists the valid ones and the closest match."""
    choices = sorted(choices)
    listed = ", ".join(choices) if choices else "none"
    return f"unknown {what} {name!r}{closest(name, choices)}; available: {listed}"


#: ``scheme://user:password@host``: the password part of a URL in any text.
#: Greedy up to the URL's last ``@``, so that a password holding an ``@`` is hidden whole.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)\S*@")
#: ``?password=...`` and its kin in a URL's query (libpq and SQLAlchemy accept them there).
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|sslpassword|token|secret)=)"
                           r"[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL, and a
    ``password=`` (or ``token=``, ``secret=``) query value, as ``***``."""
    return _QUERY_SECRET.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***@", text))


def one_line(text: str) -> str:
    """``text`` folded onto one line (messages are printed as exactly one line)."""
    return " ".join(str(text).split())
