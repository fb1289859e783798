"""Source-model plugin: vision transformers saved with Hugging Face ``save_pretrained``.

transformers is optional (``pip install 'autometa-ml[hf]'``). Without it the source model
stays registered, so that ``autometa plugins --verbose`` lists it with "unavailable:
transformers is not installed" in its description, and its ``incompatibility`` gives the
same reason: a search over all sources leaves it out, a search that names it is refused
before anything is stored. Finding out uses ``importlib.util.find_spec``, which imports
neither torch nor transformers, so listing plugins stays fast.
"""

from __future__ import annotations

import importlib.util

from autometa import hookimpl

INSTALL = "pip install 'autometa-ml[hf]'"


def missing_reason() -> str | None:
    """Why the plugin cannot be used here, or None if transformers is installed."""
    try:
        found = importlib.util.find_spec("transformers") is not None
    except ValueError:  # in sys.modules without a __spec__ (a stand-in module): present
        found = True
    return None if found else f"transformers is not installed: {INSTALL}"


@hookimpl
def register_source_models(register):
    description = ("ViT, DINOv2 and CLIP vision towers from a local Hugging Face "
                   "save_pretrained directory")
    if missing_reason():
        description += f"; unavailable: transformers is not installed ({INSTALL})"
    register(
        "transformers",
        "autometa_plugins.hf_transformers.model:TransformersModel",
        description=description,
    )
