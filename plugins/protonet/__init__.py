"""Meta-algorithm plugin: Prototypical Networks."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "protonet",
        "autometa_plugins.protonet.algorithm:ProtoNet",
        description="Prototypical Networks: nearest class mean of features (Snell et al. 2017)",
    )
