"""torch's OpenMP threads wait passively once autometa is imported first (issue 26): a busy
neighbour process collapsed sinusoid MAML from ~9,100 to ~1,700 tasks/s with the default
spin-then-sleep policy. What OpenMP itself reports (``OMP_DISPLAY_ENV=verbose``, GNU
libgomp: the spin count, 0 under the passive policy) is checked in fresh interpreters."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from limits import CLI_SEARCH, QUICK_SUBPROCESS

SINUSOID = ("import autometa\n"
            "autometa.search('sinusoid', algorithms=['maml'], sources=['mlp'], n_trials=1,"
            " meta_steps=2, eval_every=2, threads=2, baselines=False, storage='sqlite:///s.db',"
            " task_params={'val_episodes': 2, 'test_episodes': 2})\n")


def _openmp(code: str, *, policy: str | None = None, timeout: float = QUICK_SUBPROCESS,
            cwd: str | None = None) -> tuple[int | None, str]:
    """The spin count OpenMP reports in a fresh ``python -c code``, and its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    if found is None:
        pytest.skip("torch's OpenMP is not GNU libgomp here (no GOMP_SPINCOUNT reported)")
    return int(found.group(1)), done.stderr


def test_importing_autometa_first_makes_torch_threads_wait_passively() -> None:
    spin, _ = _openmp("import autometa, torch")
    assert spin == 0
    # A worker process (or any process started from it) inherits the policy.
    spin, _ = _openmp("import subprocess, sys, autometa\n"
                      "sys.exit(subprocess.call([sys.executable, '-c', 'import torch']))")
    assert spin == 0


def test_a_policy_the_user_chose_is_kept() -> None:
    spin, _ = _openmp("import autometa, torch", policy="ACTIVE")
    assert spin > 0


def test_torch_imported_first_keeps_spinning_and_a_search_says_so(tmp_path: object) -> None:
    spin, err = _openmp("import torch\n" + SINUSOID, timeout=CLI_SEARCH, cwd=str(tmp_path))
    assert spin > 0  # OpenMP read its environment before autometa could set it
    assert err.count("torch was imported before autometa") == 1, err[-2000:]
    # Imported first, the same search says nothing about it.
    spin, err = _openmp(SINUSOID.replace("s.db", "t.db"), timeout=CLI_SEARCH,
                        cwd=str(tmp_path))
    assert spin == 0 and "torch was imported before autometa" not in err
