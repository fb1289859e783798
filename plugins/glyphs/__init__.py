"""Task plugin: procedurally generated 28x28 glyph classes, unlimited, N-way K-shot."""

from autometa import hookimpl


@hookimpl
def register_tasks(register):
    register(
        "glyphs",
        "autometa_plugins.glyphs.task:Glyphs",
        description="procedurally generated 28x28 glyph classes, unlimited, N-way K-shot",
    )
