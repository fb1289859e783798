"""A stored study opened read-only on this machine: the study's settings with this
machine's own (storage, artifacts, data root, device), its input files' hashes, the
Optuna study and the plugin host; its task is built only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autometa.cache import cache_dir
from autometa.config import SearchConfig
from autometa.plugins import PluginHost, create_host
from autometa.study.build import build_task, check_device, parse_task_params
from autometa.study.inputs import check_same, fingerprints, path_settings, root_of
from autometa.study.settings import stored_search
from autometa.task import Task


@dataclass
class StoredStudy:
    """A study another process stored, opened on this machine (a leaderboard, a model
    handed back): its settings with this machine's own, the study, the plugin host.

    Nothing is built until :meth:`build_task`, so that a caller can refuse a wrong request
    (a rank out of range) before the task's data is read.
    """

    config: SearchConfig
    inputs: dict[str, Any]
    study: Any  # optuna.Study (Optuna is imported only where a study is opened)
    host: PluginHost

    @property
    def root(self) -> Path | None:
        """Where relative input paths resolve (None: the working directory)."""
        return Path(self.config.data_root) if self.config.data_root is not None else None

    def build_task(self) -> Task:
        """The study's task built here, once its input files are known to be the study's.

        Raises:
            ConfigError: an input file differs from the study's or is missing, or the
                device cannot be used here.
        """
        config, host = self.config, self.host
        params = parse_task_params(config, host)
        root = root_of(config.data_root)
        paths = path_settings(host.get("task", config.task).load(), params, "task_params")
        check_same(self.inputs, fingerprints(paths, root, cache_dir(config.cache_dir)), paths,
                   root, config.study)
        return build_task(config, host, params, check_device(config.device))


def open_stored(study_name: str, storage: str, *, host: PluginHost | None = None,
                **machine: Any) -> StoredStudy:
    """Open study ``study_name`` in ``storage`` with this machine's settings ``machine``
    (``artifacts``, ``data_root``, ``device``; see
    :func:`autometa.study.settings.stored_search`).

    Raises:
        ConfigError: no such storage or study (those there are listed); nothing is written.
    """
    config, inputs, study = stored_search(study_name, storage, **machine)
    return StoredStudy(config, inputs, study, host or create_host())
