"""Source-model plugin: the inputs themselves, flattened, as features (no network)."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "raw",
        "autometa_plugins.raw.model:Raw",
        description="the inputs flattened as features, with a linear head: baselines on "
                    "raw inputs (pixels, columns)",
    )
