"""``autometa launch BACKEND``: create a study here, then start its workers on a cluster
through the cluster's own scheduler (SLURM, Ray, Kubernetes; see :mod:`autometa.launch`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autometa.cli.search import checked_config, first_line, search_flags
from autometa.errors import ConfigError
from autometa.launch import BACKENDS, WorkerJob, backend


def add_parsers(sub: Any) -> None:
    """``launch`` and one sub-command per backend."""
    launch = sub.add_parser(
        "launch", help="create a study and start its workers on a cluster (SLURM, Ray, "
                       "Kubernetes)",
        description="Check the search's inputs and create (or resume) its study here, then "
                    "start --workers `autometa worker` processes on a cluster through its "
                    "scheduler; they run trials until the study's budget is spent. The "
                    "storage must be one every node reaches (PostgreSQL, or a SQLite file "
                    "on a shared disk for one node); its URL reaches workers in their "
                    "environment, never in a script or manifest.")
    backends = launch.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    for name in BACKENDS:
        module = backend(name)
        parser = backends.add_parser(name, help=module.HELP, description=module.HELP)
        search_flags(parser, workers="workers to start (default 1), each its own job, "
                                      "task or pod running trials until the budget is spent")
        parser.add_argument("--gpus-per-worker", type=float, default=1, metavar="G",
                            help="GPUs each worker asks its scheduler for (default 1; 0: "
                                 "CPU workers)")
        parser.add_argument("--dry-run", action="store_true",
                            help="check the inputs and print what would be submitted; "
                                 "store and submit nothing")
        module.add_arguments(parser)


def cmd_launch(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    module = backend(args.backend)
    host, config = checked_config(args)
    workers = config.workers or 1
    if args.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {args.gpus_per_worker:g}: expected 0 or more")
    if config.storage.startswith("sqlite") and ":memory:" in config.storage \
            or config.storage in ("sqlite://", "sqlite:///"):
        raise ConfigError("launched workers need a storage every node reaches: give --storage "
                          "postgresql://... (or a SQLite file on a shared disk)")
    check = getattr(module, "check", None)
    if check is not None:  # the backend's flags, library and cluster, before anything is stored
        check(args, config)
    # A dry run's first line is a comment: its output pipes into kubectl apply -f - / a file.
    first_line(f"{'# ' if args.dry_run else ''}study {config.study!r} in {config.storage}: "
               f"{workers} worker(s) via {args.backend}{' (dry run)' if args.dry_run else ''}")
    from autometa.cli.common import quiet_optuna
    from autometa.engine.run import create_search

    quiet_optuna()
    # --workers counts the launched workers, not trials at once in each: not stored (each
    # worker would take it as its own default).
    pending = create_search(dataclasses.replace(config, workers=None), host=host,
                            store=not args.dry_run)
    ready()
    if pending == 0:
        print(f"study {config.study!r}: its budget of {config.n_trials} trials is spent; "
              "nothing submitted (a larger --trials runs more)")
        return 0
    # Nodes share this machine's paths (a shared disk): relative ones are made absolute.
    artifacts = config.artifacts
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
    devices = args.devices or ("cuda" if args.gpus_per_worker > 0 else "cpu")
    job = WorkerJob(study=config.study, storage=config.storage, artifacts=artifacts,
                    data_root=str(Path(args.data_root or ".").resolve()),
                    devices=devices, workers=max(1, int(args.gpus_per_worker))
                    if devices == "cuda" else 1,
                    threads=config.threads)
    return int(module.launch(job, workers, args))
