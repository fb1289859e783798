"""Ray: one ``autometa worker`` per Ray task, placed across the cluster by Ray (``autometa
launch ray``)."""

from __future__ import annotations

import argparse

from autometa.errors import ConfigError
from autometa.launch import WorkerJob

HELP = "workers as Ray tasks across a Ray cluster (pip install 'autometa-ml[ray]')"
EXTRA = "ray"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Ray's own flags."""
    parser.add_argument("--address", default="auto",
                        help="the Ray cluster to join (ray.init address; default auto: the "
                             "cluster this node belongs to)")
    parser.add_argument("--cpus-per-worker", type=float, default=1,
                        help="CPUs each worker task asks Ray for (default 1)")


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Run ``workers`` Ray tasks each running ``job``; return when they end."""
    raise ConfigError("autometa launch ray is not built yet")
