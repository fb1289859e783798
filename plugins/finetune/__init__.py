"""Meta-algorithm plugin: the transfer-learning baseline (pre-train, then fine-tune)."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "finetune",
        "autometa_plugins.finetune.algorithm:FineTune",
        description="Baseline/Baseline++ (Chen et al. 2019): train on meta-train data, then "
                    "fine-tune a head (or all) on each support set with SGD, Adam or L-BFGS",
    )
