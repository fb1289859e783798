"""Task plugin: Meta-Album, several image datasets (domains) in Meta-Album's format, scored
per domain."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "meta-album",
        "autometa_plugins.meta_album.task:MetaAlbum",
        description="several Meta-Album datasets (domains): N-way K-shot episodes, each from "
                    "one domain drawn uniformly, meta-test scored per domain",
    )
