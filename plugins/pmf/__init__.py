"""Meta-algorithm plugin: P>M>F, a pretrained source meta-trained as a ProtoNet, then
fine-tuned on each support set with a learning rate chosen on labelled episodes."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "pmf",
        "autometa_plugins.pmf.algorithm:PMF",
        description="P>M>F (Hu et al. 2022): ProtoNet meta-training of the source model, then "
                    "the whole backbone fine-tuned per episode, its lr chosen on meta-val",
    )
