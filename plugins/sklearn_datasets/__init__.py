"""Task plugin: scikit-learn's bundled tabular datasets as target tasks."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "iris",
        "autometa_plugins.sklearn_datasets.task:Iris",
        description="scikit-learn's bundled iris as a target task",
    )
    register(
        "wine",
        "autometa_plugins.sklearn_datasets.task:Wine",
        description="scikit-learn's bundled wine as a target task",
    )
    register(
        "breast-cancer",
        "autometa_plugins.sklearn_datasets.task:BreastCancer",
        description="scikit-learn's bundled breast cancer as a target task",
    )
