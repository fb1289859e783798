"""Task plugin: few-shot classification on scikit-learn's bundled digits (8x8, 10 classes)."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "digits",
        "autometa_plugins.digits.task:Digits",
        description="N-way K-shot episodes on scikit-learn's digits, disjoint class split",
    )
