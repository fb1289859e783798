"""Source-model plugin: supervised pre-training of a backbone, cached on disk."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "pretrained",
        "autometa_plugins.pretrained.model:Pretrained",
        description="a backbone pre-trained on the meta-train classes, cached on disk",
    )
