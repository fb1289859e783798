"""Meta-algorithm plugin: the transfer-learning baseline (pre-train, then fine-tune)."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "finetune",
        "autometa_plugins.finetune.algorithm:FineTune",
        description="train on pooled meta-train data, then fine-tune on each support set",
    )
