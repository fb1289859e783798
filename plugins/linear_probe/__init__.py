"""Meta-algorithm plugin: logistic regression on frozen pre-trained features (Tian et al. 2020)."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "linear-probe",
        "autometa_plugins.linear_probe.algorithm:LinearProbe",
        description="logistic regression on frozen pre-trained features (Tian et al. 2020)",
    )
