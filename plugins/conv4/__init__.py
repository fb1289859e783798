"""Source-model plugin: the standard 4-block convolutional few-shot backbone."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "conv4",
        "autometa_plugins.conv4.model:Conv4",
        description="4 x (conv3x3, BatchNorm, ReLU, max-pool) backbone (Vinyals et al. 2016)",
    )
