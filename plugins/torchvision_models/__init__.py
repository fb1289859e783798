"""Source-model plugin: torchvision architectures with weights from a local file.

torchvision is optional. Without it the source model stays registered, so that
``autometa plugins --verbose`` lists it with "unavailable: torchvision is not installed" in
its description, and its ``incompatibility`` gives the same reason: a search over all
sources leaves it out, a search that names it is refused before anything is stored.
Finding out uses ``importlib.util.find_spec``, which imports neither torch nor torchvision.
"""

from __future__ import annotations

import importlib.util

from autometa import hookimpl

INSTALL = "pip install torchvision (the release matching your torch)"


def missing_reason() -> str | None:
    """Why the plugin cannot be used here, or None if torchvision is installed."""
    try:
        found = importlib.util.find_spec("torchvision") is not None
    except ValueError:  # in sys.modules without a __spec__ (a stand-in module): present
        found = True
    return None if found else f"torchvision is not installed: {INSTALL}"


@hookimpl
def register_source_models(register):
    description = "torchvision architectures with weights from a local file"
    if missing_reason():
        description += "; unavailable: torchvision is not installed (pip install torchvision)"
    register(
        "torchvision",
        "autometa_plugins.torchvision_models.model:TorchvisionModel",
        description=description,
    )
