"""Meta-algorithm plugin: MAML (Finn et al. 2017), second order, first order as an option."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "maml",
        "autometa_plugins.maml.algorithm:MAML",
        description="Model-Agnostic Meta-Learning; first_order=True gives FOMAML",
    )
