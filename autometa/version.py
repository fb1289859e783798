"""autometa's version, in one place below every other module: the package, the stored
studies, reports and exported models name it."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
