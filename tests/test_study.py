"""The search engine's checks before anything is stored."""

from __future__ import annotations

import pytest

import autometa
import autometa_plugins.maml
import autometa_plugins.mlp
from autometa import ConfigError, create_host
from autometa_plugins.sinusoid.task import Sinusoid


class NeedsPath(Sinusoid):
    """A task with a required keyword (as a plugin author may write one)."""

    def __init__(self, *, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = path


class _Plugin:
    @staticmethod
    @autometa.hookimpl
    def register_tasks(register):
        register("needs-path", NeedsPath)


def test_a_missing_required_task_parameter_is_one_clear_error(tmp_path):
    host = create_host(entry_points=False, plugins={
        "t": _Plugin(), "maml": autometa_plugins.maml, "mlp": autometa_plugins.mlp})
    with pytest.raises(ConfigError, match="task 'needs-path' needs 'path'; set "
                                          "--task-param path=..."):
        autometa.search("needs-path", host=host, storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert not (tmp_path / "a.db").exists()  # nothing was stored
