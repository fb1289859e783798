"""Source-model plugin: an architecture with weights from a local file (weights_only loading)."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "checkpoint",
        "autometa_plugins.checkpoint.model:Checkpoint",
        description="an architecture with weights from a local file (weights_only loading)",
    )
