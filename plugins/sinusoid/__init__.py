"""Task plugin: the sinusoid regression distribution of the MAML paper."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "sinusoid",
        "autometa_plugins.sinusoid.task:Sinusoid",
        description="K-shot regression of A*sin(x - phase) (Finn et al. 2017)",
    )
