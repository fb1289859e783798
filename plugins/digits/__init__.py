"""Task plugin: scikit-learn's bundled digits (8x8, 10 classes), few-shot and one-vs-rest."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "digits",
        "autometa_plugins.digits.task:Digits",
        description="N-way K-shot episodes on scikit-learn's digits, disjoint class split",
    )
    register(
        "digits-vs-rest",
        "autometa_plugins.digits.task:DigitsVsRest",
        description="is it a 3? one digit against the rest, binary, train/val/test split",
    )
