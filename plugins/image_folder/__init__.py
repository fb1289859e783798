"""Task plugin: a local directory of images, one folder per class, or the Omniglot layout."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "image-folder",
        "autometa_plugins.image_folder.task:ImageFolder",
        description="a local directory of images, one folder per class, or the Omniglot layout",
    )
