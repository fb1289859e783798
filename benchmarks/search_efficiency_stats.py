"""The search-efficiency benchmark's statistics, from the rows of its runs.

* :func:`summarise`: per strategy, its **success rate** (seeds whose search reached the
  target / seeds, with a 95% Wilson interval) and its compute (meta-steps, wall seconds,
  trials, the ratio to random search's whole run) over the seeds that **succeeded only**,
  as the median and quartiles. An unreached seed is never averaged in.
* :func:`paired`: every pair of strategies over the seeds both ran: wins, losses and
  ties on meta-steps to the target (an unreached seed costs +inf: it loses to any seed
  that reached, ties with another unreached), a sign test, and Wilcoxon's signed-rank
  test with an unreached seed at the worst rank; Holm's correction over the pairs.
* :func:`choose_pruner`: the pruner the portfolio and warm start use, chosen from the
  selection seeds' rows (which never appear in the reported table).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from itertools import combinations
from typing import Any

ALPHA = 0.05


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); NaNs for no values."""
    if not values:
        return math.nan, math.nan, math.nan
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of ``successes / n`` (scipy's)."""
    from scipy.stats import binomtest

    if n < 1:
        return math.nan, math.nan
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def strategies(rows: list[dict[str, Any]]) -> list[str]:
    """The strategies of ``rows``, in the order they first appear."""
    return list(dict.fromkeys(r["strategy"] for r in rows))


def cost(row: dict[str, Any]) -> float:
    """Meta-steps to the target; +inf if the seed never reached it."""
    return float(row["meta_steps"]) if row["reached"] else math.inf


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: success rate (Wilson 95%) and, over its succeeding seeds only, the
    quartiles of meta-steps, wall seconds, trials and meta-steps ÷ random search's whole
    run (same seed)."""
    out = []
    for name in strategies(rows):
        mine = [r for r in rows if r["strategy"] == name]
        ok = [r for r in mine if r["reached"]]
        low, high = wilson(len(ok), len(mine))
        out.append({
            "strategy": name, "seeds": len(mine), "successes": len(ok),
            "success_rate": len(ok) / len(mine), "success_low": low, "success_high": high,
            "meta_steps": quartiles([float(r["meta_steps"]) for r in ok]),
            "wall_s": quartiles([float(r["wall_s"]) for r in ok]),
            "trials": quartiles([float(r["trials"]) for r in ok]),
            "steps_vs_all": quartiles([r["meta_steps"] / max(r["random_total_meta_steps"], 1)
                                       for r in ok]),
            "baseline_reaches": sum(bool(r.get("baseline_reaches")) for r in mine)})
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def signed_rank(a: list[float], b: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired costs, +inf (unreached) put above
    every finite cost (its difference to a reached seed outranks every finite difference;
    two unreached seeds tie). 1.0 when every pair ties."""
    from scipy.stats import wilcoxon

    finite = [x for x in a + b if math.isfinite(x)]
    big = 2 * max(finite, default=1.0) + 1
    x = [v if math.isfinite(v) else big for v in a]
    y = [v if math.isfinite(v) else big for v in b]
    if all(u == v for u, v in zip(x, y, strict=True)):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few pairs: scipy warns of its approximation
        return float(wilcoxon(x, y, zero_method="wilcox").pvalue)


def sign_test(wins: int, losses: int) -> float:
    from scipy.stats import binomtest

    return 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses).pvalue)


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair (A, B) of strategies over their common seeds; ``a_cheaper`` counts the
    seeds where A needed fewer meta-steps to the target (reaching beats not reaching);
    ``holm`` adjusts the Wilcoxon p-values over all pairs, ``holm_vs_random`` over the
    pairs with random search alone (None for the others)."""
    by = {(r["strategy"], r["seed"]): cost(r) for r in rows}
    names = strategies(rows)
    out = []
    for a, b in combinations(names, 2):
        seeds = sorted({s for n, s in by if n == a} & {s for n, s in by if n == b})
        ca, cb = [by[a, s] for s in seeds], [by[b, s] for s in seeds]
        wins = sum(x < y for x, y in zip(ca, cb, strict=True))
        losses = sum(x > y for x, y in zip(ca, cb, strict=True))
        out.append({"a": a, "b": b, "seeds": len(seeds), "a_cheaper": wins,
                    "b_cheaper": losses, "ties": len(seeds) - wins - losses,
                    "wilcoxon_p": signed_rank(ca, cb) if seeds else 1.0,
                    "sign_p": sign_test(wins, losses)})
    for pair, p in zip(out, holm([p["wilcoxon_p"] for p in out]), strict=True):
        pair["holm"] = p
    versus = [p for p in out if "random" in (p["a"], p["b"])]
    for pair, p in zip(versus, holm([p["wilcoxon_p"] for p in versus]), strict=True):
        pair["holm_vs_random"] = p
    return out


def verdict(pair: dict[str, Any], key: str = "holm") -> str:
    """Which of the pair is cheaper, if the (adjusted) test says so at :data:`ALPHA`."""
    p = pair.get(key)
    if p is None or p >= ALPHA or pair["a_cheaper"] == pair["b_cheaper"]:
        return "not told apart"
    return f"{pair['a'] if pair['a_cheaper'] > pair['b_cheaper'] else pair['b']} cheaper"


def smallest_p(n: int) -> float:
    """The smallest two-sided p-value a paired test can give on ``n`` seeds."""
    return min(1.0, 2 / 2**n) if n else 1.0


def choose_pruner(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The pruner of the best pruned strategy on the selection seeds' ``rows``: highest
    success rate, then the lowest median meta-steps ÷ random's whole run over its
    successes, then the order of the strategies. Returns (pruner, the summary used)."""
    summary = [s for s in summarise(rows) if s["strategy"].startswith("tpe")]
    best = min(summary, key=lambda s: (-s["success_rate"],
                                       s["steps_vs_all"][1] if s["successes"] else math.inf))
    return best["strategy"].partition("+")[2] or "none", summary
