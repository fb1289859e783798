"""The search-efficiency benchmark's Markdown: one file per task, from its result."""

from __future__ import annotations

import math
from typing import Any

from harness import markdown_table
from search_efficiency_stats import smallest_p, verdict


def _q(q: tuple[float, float, float] | list[float], fmt: str = ",.0f") -> str:
    """``median [q1, q3]``, or – where no seed succeeded."""
    q1, q2, q3 = q
    if math.isnan(q2):
        return "–"
    return f"{q2:{fmt}} [{q1:{fmt}}, {q3:{fmt}}]"


def _score(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _load(env: dict[str, Any]) -> str:
    load = env.get("load") or {}
    if not load:
        return "load not recorded"
    return (f"1-minute load average at start {load['start']:.2f}, during the run "
            f"{load['mean']:.2f} on average (max {load['max']:.2f}, {load['samples']} "
            f"samples), at the end {load['end']:.2f}")


def markdown(result: dict[str, Any]) -> str:
    """The tables of one task's ``result`` (:func:`search_efficiency.task_result`)."""
    args, env, task = result["args"], result["environment"], result["task"]
    scale = result["scale"]
    summary, pairs, rows = result["summary"], result["paired"], result["rows"]
    n = len(result["seeds"])
    lines = [
        f"# Search efficiency: {task}", "",
        f"**Environment.** {env['cpu']}, torch {env['torch']} (1 thread per process, "
        f"{args['processes']} processes), Python {env['python']}, Optuna {env['optuna']}, "
        f"autometa {env['commit']}; {env['date']}; {env['minutes']:.0f} min for the whole "
        f"run (every task); {_load(env)}.", "",
        f"**Setting.** Target = the best meta-val score ({result['direction']}) of the "
        f"searched trials of {scale['random_trials']} unpruned random trials (same task and "
        f"seed); {scale['meta_steps']} meta-steps per trial, meta-val every "
        f"{scale['eval_every']} on {scale['val_episodes']} episodes; every other strategy "
        f"searches until its best ranked searched trial reaches the target, or "
        f"{scale['random_trials']} searched trials; "
        f"the related study of the warm start: {scale['related_trials']} trials.",
        "",
        f"**Seeds.** Reported: {result['seeds']}. Selection (the portfolio's and warm "
        f"start's pruner is chosen on these, and they appear nowhere else): "
        f"{result['select_seeds']}. Chosen pruner: **{result['pruner']}**.", "",
        "**Method.** A seed that never reaches the target is *unreached*: it counts in the "
        "success rate (95% Wilson interval) and never in the compute, which is the "
        "median [first quartile, third quartile] over the succeeding seeds only. "
        "Random search reaches its own best by definition (its compute is up to the "
        "trial that found it). Baseline trials (0 meta-steps, outside the budget) never "
        "count towards the target nor the compute; their wall time is reported apart.", ""]
    lines += baselines_paragraph(result)
    lines += ["", "## Success and compute", "", markdown_table(
        ["strategy", "success", "95% CI", "meta-steps", "meta-steps ÷ random's whole run",
         "wall s", "trials", f"vs random (Wilcoxon, Holm, {n} seeds)"],
        [[s["strategy"], f"{s['successes']}/{s['seeds']}",
          f"{s['success_low']:.2f}–{s['success_high']:.2f}", _q(s["meta_steps"]),
          _q(s["steps_vs_all"], ".2f"), _q(s["wall_s"]), _q(s["trials"]),
          _versus_random(s["strategy"], pairs)] for s in summary])]
    lines += ["", "## Paired comparisons over seeds", "",
              "Meta-steps to the target per seed, unreached = +inf (worst rank). "
              "*cheaper* counts the seeds where each needed fewer; sign test and "
              "Wilcoxon signed-rank p (two-sided), Holm-adjusted over all pairs. With "
              f"{n} seeds no paired test can give p below {smallest_p(n):.3g}.", "",
              markdown_table(
                  ["A", "B", "A cheaper", "B cheaper", "ties", "sign p", "Wilcoxon p",
                   "Holm p", "verdict"],
                  [[p["a"], p["b"], p["a_cheaper"], p["b_cheaper"], p["ties"],
                    f"{p['sign_p']:.3f}", f"{p['wilcoxon_p']:.3f}", f"{p['holm']:.3f}",
                    verdict(p)] for p in pairs])]
    lines += ["", "## Pruner selection (selection seeds only)", "", markdown_table(
        ["strategy", "success", "meta-steps ÷ random's whole run"],
        [[s["strategy"], f"{s['successes']}/{s['seeds']}", _q(s["steps_vs_all"], ".2f")]
         for s in result["selection"]])]
    lines += ["", "## Per seed", "", per_seed(rows + result["selection_rows"])]
    lines += ["", f"Command: `python benchmarks/search_efficiency.py {env['command']}`"]
    return "\n".join(lines) + "\n"


def _versus_random(name: str, pairs: list[dict[str, Any]]) -> str:
    for p in pairs:
        if name in (p["a"], p["b"]) and "random" in (p["a"], p["b"]) and name != "random":
            return f"{verdict(p, 'holm_vs_random')} (p {p['holm_vs_random']:.3f})"
    return "–"


def baselines_paragraph(result: dict[str, Any]) -> list[str]:
    """Whether a baseline alone already reaches the target, per reported seed."""
    random = [r for r in result["rows"] if r["strategy"] == "random"]
    with_base = [r for r in random if r["baseline_trials"]]
    if not with_base:
        return ["**Baselines.** None ran (a regression task has no baseline)."]
    reaching = [r["seed"] for r in with_base if r["baseline_reaches"]]
    scores = ", ".join(f"seed {r['seed']}: {_score(r['baseline_best'])} vs "
                       f"{_score(r['target'])}" for r in with_base)
    wall = sum(r["baseline_wall_s"] for r in with_base) / len(with_base)
    return [f"**Baselines.** {with_base[0]['baseline_trials']} baseline trials per study "
            f"({wall:.0f} s of wall per study, not counted). A baseline alone reaches "
            f"the target on {len(reaching)}/{len(with_base)} reported seeds"
            f"{' (' + ', '.join(map(str, reaching)) + ')' if reaching else ''}: best "
            f"baseline vs target, {scores}."]


def per_seed(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["seeds", "seed", "strategy", "target", "best", "reached", "trials", "meta-steps",
         "wall s", "baseline best"],
        [[r["role"], r["seed"], r["strategy"], _score(r["target"]), _score(r["best"]),
          "yes" if r["reached"] else "**unreached**", r["trials"],
          f"{r['meta_steps']:,.0f}", f"{r['wall_s']:.0f}", _score(r["baseline_best"])]
         for r in rows])
