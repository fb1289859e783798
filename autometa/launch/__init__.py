"""Launchers: start ``autometa worker`` processes for a stored study on a cluster, through
that cluster's own scheduler (``autometa launch BACKEND``).

A launcher only starts workers; the storage stays the one source of truth (the budget,
the trials, their retries), as in optuna-examples' Kubernetes Job and Ray Tune's
controller/worker split. Each backend is a module of this package with

* ``NAME``: the ``autometa launch NAME`` word; ``EXTRA``: the pip extra it needs;
* ``add_arguments(parser)``: its own flags (no heavy import);
* ``check(args, config)`` (optional): its flags and the cluster checked before the study
  is stored (a :class:`~autometa.errors.ConfigError` naming the fix);
* ``launch(job, workers, args) -> int``: start ``workers`` workers running ``job`` (imports
  its scheduler's library there; a missing one is a :class:`~autometa.errors.ConfigError`
  naming the install line) and return the exit code.

The storage URL travels in the environment (:data:`STORAGE_ENV`), never in a command
line, script or manifest: those are printed (``--dry-run``), logged and stored by the
schedulers.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from dataclasses import dataclass
from types import ModuleType

from autometa.errors import ConfigError

#: The environment variable ``autometa worker`` reads its storage URL from when ``--storage``
#: is not given (launched workers: the URL holds a password).
STORAGE_ENV = "AUTOMETA_STORAGE"

#: ``autometa launch`` word -> module of this package.
BACKENDS = {"slurm": "slurm", "ray": "ray_cluster", "k8s": "kubernetes"}


@dataclass(frozen=True)
class WorkerJob:
    """What every launched worker runs: ``autometa worker STUDY`` with this machine-free
    part of its settings (each node's GPU comes from its scheduler).

    Attributes:
        study: the stored study's name.
        storage: its storage URL (with any password): given to workers as
            :data:`STORAGE_ENV`, never in their command line.
        artifacts: the artifact store as the nodes reach it (a shared directory or
            ``s3://BUCKET``); ``None``: the study's.
        data_root: where the nodes find the study's relative data paths.
        devices: each worker's ``--devices`` (``cuda`` = the GPUs its scheduler gave it,
            ``cpu``).
        workers: trials at once in each worker (one per GPU its scheduler gives it).
        threads: torch CPU threads per worker; ``None``: torch's default.
        python: the nodes' Python (default: this one, for a shared environment).
    """

    study: str
    storage: str
    artifacts: str | None = None
    data_root: str | None = None
    devices: str = "cuda"
    workers: int = 1
    threads: int | None = None
    python: str = sys.executable

    def argv(self) -> list[str]:
        """The worker's command line, without the storage URL (see :meth:`env`)."""
        argv = [self.python, "-m", "autometa", "worker", self.study, "--devices", self.devices,
                "--workers", str(self.workers), "--no-progress"]
        if self.artifacts is not None:
            argv += ["--artifacts", self.artifacts]
        if self.data_root is not None:
            argv += ["--data-root", self.data_root]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        return argv

    def command(self) -> str:
        """:meth:`argv` as one shell-quoted line (for scripts and manifests)."""
        return shlex.join(self.argv())

    def env(self) -> dict[str, str]:
        """The environment a worker needs beyond its node's: the storage URL."""
        return {STORAGE_ENV: self.storage}


def backend(name: str) -> ModuleType:
    """The backend module named ``name`` (``slurm``, ``ray``, ``k8s``).

    Raises:
        ConfigError: an unknown backend (the known ones listed).
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown launcher {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"autometa.launch.{BACKENDS[name]}")


__all__ = ["BACKENDS", "STORAGE_ENV", "WorkerJob", "backend"]
