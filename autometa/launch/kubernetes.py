"""Kubernetes: a Job of ``autometa worker`` pods with parallelism N (``autometa launch
k8s``), as in optuna-examples/kubernetes."""

from __future__ import annotations

import argparse

from autometa.errors import ConfigError
from autometa.launch import WorkerJob

HELP = "a Kubernetes Job of worker pods (its manifest with --dry-run)"
EXTRA = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Kubernetes' own flags."""
    parser.add_argument("--image", help="the worker image (see docker/Dockerfile)")
    parser.add_argument("--secret", default="autometa-storage",
                        help="the Secret whose key 'url' holds the storage URL (default "
                             "autometa-storage): never written into the manifest")
    parser.add_argument("--namespace", help="Kubernetes namespace")
    parser.add_argument("--output", help="write the manifest to this file (default: stdout)")


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Write (``--dry-run``) or apply the Job manifest for ``workers`` pods."""
    raise ConfigError("autometa launch k8s is not built yet")
