"""Append one JSON line per finished trial (and a summary line per search) to a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import autometa


def _write(record: dict) -> None:
    path = Path(os.environ.get("AUTOMETA_JSONL", "autometa-trials.jsonl"))
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


@autometa.hookimpl
def trial_finished(study_name, trial):
    _write({"study": study_name, "trial": trial.number, "state": trial.state.name,
            "value": trial.value, "params": trial.params})


@autometa.hookimpl
def search_finished(study_name, leaderboard):
    best = leaderboard.frame.head(1).to_dict("records")
    _write({"study": study_name, "event": "search_finished", "best": best})
