"""SLURM: a job array of ``autometa worker`` tasks through submitit (``autometa launch
slurm``)."""

from __future__ import annotations

import argparse

from autometa.errors import ConfigError
from autometa.launch import WorkerJob

HELP = "a SLURM job array of workers through submitit (pip install 'autometa-ml[slurm]')"
EXTRA = "slurm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """SLURM's own flags, passed through to sbatch."""
    parser.add_argument("--partition", help="SLURM partition (sbatch --partition)")
    parser.add_argument("--time-limit", type=int, metavar="MINUTES",
                        help="each worker job's time limit in minutes (sbatch --time)")
    parser.add_argument("--account", help="SLURM account to charge (sbatch --account)")
    parser.add_argument("--cpus-per-worker", type=int, help="CPUs per worker task")
    parser.add_argument("--folder", default="autometa-slurm",
                        help="where submitit writes job scripts and logs (default "
                             "autometa-slurm; on a disk the nodes share)")


def launch(job: WorkerJob, workers: int, args: argparse.Namespace) -> int:
    """Submit ``workers`` array tasks each running ``job``."""
    raise ConfigError("autometa launch slurm is not built yet")
