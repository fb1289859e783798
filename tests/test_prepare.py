"""The search engine's checks before anything is stored."""

from __future__ import annotations

import pytest

import autometa
import autometa_plugins.maml
import autometa_plugins.mlp
import autometa_plugins.sinusoid
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


def test_a_search_space_that_takes_the_task_drops_what_the_task_cannot_use(tmp_path):
    """finetune's classifier settings are not searched on a regression task."""
    import autometa_plugins.finetune

    host = create_host(entry_points=False, plugins={
        "finetune": autometa_plugins.finetune, "mlp": autometa_plugins.mlp,
        "sinusoid": autometa_plugins.sinusoid})
    board = autometa.search("sinusoid", host=host, algorithms=["finetune"], sources=["mlp"],
                            task_params={"val_episodes": 2, "test_episodes": 2,
                                         "eval_queries": 5},
                            algorithm_params={"finetune": {"finetune_steps": 10}},
                            n_trials=1, meta_steps=2, eval_every=2, top_k=1,
                            storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"))
    params = board.frame["params"][0]
    assert "optimizer=" in params and "finetune_lr=" in params
    assert "head=" not in params and "batch_size=" not in params
