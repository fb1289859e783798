"""Meta-algorithm plugin: Reptile (Nichol et al. 2018), first-order, no meta-gradient."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "reptile",
        "autometa_plugins.reptile.algorithm:Reptile",
        description="Reptile: move the initialisation towards weights trained on each task",
    )
