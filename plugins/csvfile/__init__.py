"""Task plugin: a local CSV file."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "csv",
        "autometa_plugins.csvfile.task:CSVTask",
        description="a local CSV file: classification or regression on a target column",
    )
