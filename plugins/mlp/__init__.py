"""Source-model plugin: a fully connected network."""

from autometa import hookimpl


@hookimpl
def register_source_models(register):
    register(
        "mlp",
        "autometa_plugins.mlp.model:MLP",
        description="ReLU multilayer perceptron on flattened inputs (MAML's 40-40 by default)",
    )
