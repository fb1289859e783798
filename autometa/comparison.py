"""Every algorithm compared: the best fully trained trial of each algorithm (and of each
source model), beside the overall ranking.

The overall leaderboard lists trials; a reader also asks "how did MAML do?", and a
pruner may have stopped every trial of an algorithm (issue 23). So a leaderboard carries
one row per algorithm (:attr:`autometa.leaderboard.Leaderboard.by_algorithm`) and per
source (``by_source``): its best COMPLETE, unpruned trial on meta-val, with that trial's
overall rank, meta-test score (every such trial is scored, whatever its rank) and tie
group against the overall best; the baselines in rows of their own; and, for a name with
no fully trained trial, a row saying how its trials ended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from autometa.study.baselines import is_baseline
from autometa.study.completion import is_completion, plan_field, pruned

#: The two groupings, and the leaderboard column each one reads.
KEYS = ("algorithm", "source")
#: Columns copied from the best trial's leaderboard row (``<metric>`` filled in).
ROW_COLUMNS = ("rank", "trial", "val_{m}", "test_{m}", "test_ci95", "test_ci_low",
               "test_ci_high", "test_n", "test_ci_over", "test_ci_method", "tie_group",
               "p_vs_best")


def compare(frame: pd.DataFrame, trials: Iterable[Any], key: str, metric: str,
            stored: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per ``key`` (``"algorithm"`` or ``"source"``) value and kind (searched, or
    baseline): the best ranked trial of that group in the leaderboard ``frame`` (best
    first), or none.

    Columns: ``<key>``, ``baseline``, then those of :data:`ROW_COLUMNS` (empty for a group
    with no fully trained trial), ``completion`` (the best trial re-ran a pruned
    configuration in full, :mod:`autometa.study.completion`), ``complete``, ``pruned``,
    ``failed`` (its trials per final state; a crashed trial that ran again is not
    counted) and ``note`` (why a group has no row of numbers). Groups with a trained trial
    come first, in the order of their best trial's rank.

    Args:
        trials: every trial of the study (frozen Optuna trials), for the counts.
        stored: the study's stored settings (:mod:`autometa.study.settings`): each
            algorithm (or source) it searched gets a row even if no trial of it exists.
    """
    columns = [c.format(m=metric) for c in ROW_COLUMNS]
    tally: dict[tuple[str, bool], dict[str, int]] = {}
    completions: set[int] = set()
    for name in (stored or {}).get("spaces", {}).get(key) or {}:  # those it resolved
        tally.setdefault((str(name), False), _zero())
    for t in trials:
        name = plan_field(t, key)
        if not name:
            continue
        counts = tally.setdefault((name, is_baseline(t)), _zero())
        state = t.state.name
        if pruned(t):
            counts["pruned"] += 1
        elif state == "COMPLETE":
            counts["complete"] += 1
        elif state == "FAIL" and "failure" in t.user_attrs:
            counts["failed"] += 1
        if is_completion(t):
            completions.add(t.number)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, bool]] = set()
    for d in frame.to_dict("records"):  # best first
        group = (str(d[key]), bool(pd.notna(d.get("baseline")) and d.get("baseline")))
        if group in seen:
            continue
        seen.add(group)
        rows.append({key: group[0], "baseline": group[1], **{c: d.get(c) for c in columns},
                     "completion": int(d["trial"]) in completions,
                     **tally.get(group, _zero()), "note": ""})
    for group, counts in tally.items():
        if group not in seen:
            rows.append({key: group[0], "baseline": group[1],
                         **{c: None for c in columns}, "completion": False, **counts,
                         "note": untrained(counts)})
    out = pd.DataFrame(rows, columns=[key, "baseline", *columns, "completion", "complete",
                                      "pruned", "failed", "note"])
    for c in ("rank", "trial", "tie_group"):
        out[c] = out[c].astype("Int64")
    return out


def _zero() -> dict[str, int]:
    return {"complete": 0, "pruned": 0, "failed": 0}


def untrained(counts: dict[str, int]) -> str:
    """The note of a group with no fully trained trial."""
    if not counts["pruned"] and not counts["failed"]:
        return "no trial ran"
    return (f"no fully trained trial: pruned {counts['pruned']} time(s), failed "
            f"{counts['failed']} time(s)")
