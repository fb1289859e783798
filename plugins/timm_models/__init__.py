"""Source-model plugin: timm architectures with weights from a local file.

timm is optional (``pip install timm``; it needs torchvision). Without it the source model
stays registered, so that ``autometa plugins --verbose`` lists it with "unavailable: timm
is not installed" in its description, and its ``incompatibility`` gives the same reason.
Finding out uses ``importlib.util.find_spec``, which imports neither torch nor timm.
"""

from __future__ import annotations

import importlib.util

from autometa import hookimpl

INSTALL = "pip install timm (it needs the torchvision release matching your torch)"


def missing_reason() -> str | None:
    """Why the plugin cannot be used here, or None if timm is installed."""
    try:
        found = importlib.util.find_spec("timm") is not None
    except ValueError:  # in sys.modules without a __spec__ (a stand-in module): present
        found = True
    return None if found else f"timm is not installed: {INSTALL}"


@hookimpl
def register_source_models(register):
    description = "timm architectures with weights from a local file"
    if missing_reason():
        description += "; unavailable: timm is not installed (pip install timm)"
    register(
        "timm",
        "autometa_plugins.timm_models.model:TimmModel",
        description=description,
    )
