"""optuna-dashboard serves autometa's trial states with the command the README gives,
``optuna-dashboard sqlite:///autometa.db --artifact-dir autometa-artifacts``: its own
server, started as a user starts it, downloading each trial's state over HTTP."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from conftest import SMALL_SINUSOID
from limits import QUICK_SUBPROCESS, STOPPED_PROCESS

import autometa
from autometa.cli import main

SEARCH = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
          "--trials", "2", "--meta-steps", "4", "--eval-every", "2", "--pruner", "none",
          "--no-baselines", "--no-progress",
          *(a for k, v in SMALL_SINUSOID.items() for a in ("--task-param", f"{k}={v}"))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Dashboard:
    """`optuna-dashboard URL --artifact-dir DIR` running on a free port of 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=QUICK_SUBPROCESS) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def api(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)


@contextlib.contextmanager
def dashboard() -> Iterator[Dashboard]:
    """The documented command, run in the folder `autometa run` ran in (the test's)."""
    port = _free_port()
    command = [str(Path(sys.executable).with_name("optuna-dashboard")), "sqlite:///autometa.db",
               "--artifact-dir", "autometa-artifacts", "--port", str(port), "--server",
               "wsgiref", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    board = Dashboard(process, port)
    try:
        deadline = time.monotonic() + 120  # guards a hang only
        while True:
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            try:
                board.get("/api/studies")
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard never answered"
                time.sleep(0.2)
        yield board
    finally:
        process.terminate()
        process.wait(timeout=STOPPED_PROCESS)


def test_the_documented_dashboard_command_downloads_every_studys_trial_states() -> None:
    # Two studies in one storage and one store: the dashboard has one --artifact-dir for all.
    for seed in ("0", "1"):
        assert main([*SEARCH, "--seed", seed]) == 0
    with dashboard() as served:
        _check_downloads(served)


def _check_downloads(dashboard: Dashboard) -> None:
    studies = {s["study_name"]: s["study_id"]
               for s in dashboard.api("/api/studies")["study_summaries"]}
    assert set(studies) == {"sinusoid-seed0", "sinusoid-seed1"}
    downloaded = 0
    for name, study_id in studies.items():
        trials = {t["number"]: t for t in dashboard.api(f"/api/studies/{study_id}")["trials"]}
        for rank in (1, 2):
            model = autometa.load_model(name, rank)  # the state autometa hands back
            trial = trials[model.trial]
            artifact, = trial["artifacts"]
            assert artifact["filename"] == f"trial-{model.trial}.pt"
            status, body = dashboard.get(f"/artifacts/{study_id}/{trial['trial_id']}/"
                                         f"{artifact['artifact_id']}")
            assert status == 200, body[:300]
            state = torch.load(io.BytesIO(body), weights_only=True)
            assert _same(state, model.meta_algorithm.state_dict()) and state
            downloaded += 1
    assert downloaded == 4


def _same(got: Any, expected: Any) -> bool:
    """Equal nested state dicts: the same keys, tensors equal element by element."""
    if isinstance(expected, dict):
        return (isinstance(got, dict) and got.keys() == expected.keys()
                and all(_same(got[k], expected[k]) for k in expected))
    if isinstance(expected, torch.Tensor):
        return isinstance(got, torch.Tensor) and torch.equal(got, expected)
    return bool(got == expected)
