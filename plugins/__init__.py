"""autometa's first-party plugins.

Each subpackage is a complete plugin, loaded through the ``autometa`` entry-point group
exactly like a third-party package: its ``__init__`` holds the hook implementations and
imports nothing heavy; the implementation module is imported only when a run uses it.
Copy any of them to start a plugin of your own.
"""
