"""Meta-algorithm plugin: Meta-SGD (Li et al. 2017), MAML with learned per-parameter step sizes."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "metasgd",
        "autometa_plugins.metasgd.algorithm:MetaSGD",
        description="Meta-SGD: MAML that also learns a step size per parameter entry",
    )
