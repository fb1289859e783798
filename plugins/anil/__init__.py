"""Meta-algorithm plugin: ANIL (Raghu et al. 2020), MAML with a head-only inner loop."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "anil",
        "autometa_plugins.anil.algorithm:ANIL",
        description="ANIL: MAML whose inner loop adapts only the head (the last layer)",
    )
