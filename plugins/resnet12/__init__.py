"""Source-model plugin: the standard few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019)."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "resnet12",
        "autometa_plugins.resnet12.model:ResNet12",
        description="the standard few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019)",
    )
