"""The report of speed.py: the summary against peers and reference, and the tables.

:func:`summarise` compares autometa (``auto``) per workload with the fastest peer and the
fastest reference (paired ratios), :func:`summarise_prototypes` each prototype with the
contender it patches, and :func:`report` renders a result as terminal text and Markdown.
"""

from __future__ import annotations

from typing import Any

from harness import describe_environment, markdown_table, paired_ratio, ratio, text_table
from speed_contenders import PEERS
from speed_prototypes import PROTOTYPE_BASE
from workloads import META_LR


def paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over repetitions of a's tasks/s over b's in the same repetition."""
    return paired_ratio(a["runs"], b["runs"])


def summarise(speed: list[dict[str, Any]], sampling: dict[str, Any], fast_target: float,
              conv4_target: float = 1.5) -> list[dict[str, Any]]:
    """Per workload and step count: autometa (auto) against the fastest peer and reference
    (targets: ``fast_target`` on sinusoid, ``conv4_target`` on conv4)."""
    out = []
    for model, steps in dict.fromkeys((r["model"], r["inner_steps"]) for r in speed):
        rows = {r["contender"]: r for r in speed
                if r["model"] == model and r["inner_steps"] == steps}
        if "autometa-auto" not in rows:
            continue
        auto = rows["autometa-auto"]
        # A contender whose meta-gradient disagrees is no yardstick.
        peers = [r for k, r in rows.items() if k in PEERS and not r["void"]]
        refs = [r for k, r in rows.items() if k.startswith("reference") and not r["void"]]
        # Ratios are paired: the median over repetitions of autometa's rate over the other's
        # in the same repetition (interleaved, so a slow spell of the machine hits both).
        # The yardstick is the contender autometa compares worst with.
        best_peer = min(peers, key=lambda r: paired(auto, r), default=None)
        best_ref = min(refs, key=lambda r: paired(auto, r), default=None)
        chosen = auto["strategy"].rsplit("→", 1)[-1]
        same_ref = rows.get(f"reference-{chosen}")
        peer_ratio = paired(auto, best_peer) if best_peer else None
        need = fast_target if model.split(" (")[0] == "sinusoid" else conv4_target  # "(neighbour)"
        row = {
            "model": model, "inner_steps": steps, "autometa_strategy": auto["strategy"],
            "autometa_gradient_agrees": not auto["void"],
            "autometa_first_step_s": auto["first_step_s"],
            "autometa_tasks_per_s": auto["tasks_per_s"],
            "fastest_peer": best_peer["contender"] if best_peer else None,
            "fastest_peer_tasks_per_s": best_peer["tasks_per_s"] if best_peer else None,
            "autometa_over_fastest_peer": peer_ratio,
            "peer_target": need,
            "peer_target_met": None if peer_ratio is None else peer_ratio >= need,
            "fastest_reference": best_ref["contender"] if best_ref else None,
            "overhead_vs_fastest_reference_pct":
                100 * (1 / paired(auto, best_ref) - 1) if best_ref else None,
            "overhead_vs_same_strategy_reference_pct":
                100 * (1 / paired(auto, same_ref) - 1) if same_ref else None,
        }
        overhead = row["overhead_vs_fastest_reference_pct"]
        row["overhead_target_met"] = None if overhead is None else overhead <= 5.0
        if (model, steps) in sampling:
            row["sampling_pct_of_step"] = sampling[(model, steps)]["percent_of_step"]
        out.append(row)
    return out


def summarise_prototypes(speed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = {(r["model"], r["inner_steps"], r["contender"]): r for r in speed}
    out = []
    for r in speed:
        base = index.get((r["model"], r["inner_steps"], PROTOTYPE_BASE.get(r["contender"], "")))
        if base is None:
            continue
        auto = index.get((r["model"], r["inner_steps"], "autometa-auto"))
        out.append({"model": r["model"], "inner_steps": r["inner_steps"],
                    "prototype": r["contender"], "tasks_per_s": r["tasks_per_s"],
                    "first_step_s": r["first_step_s"], "baseline": base["contender"],
                    "baseline_tasks_per_s": base["tasks_per_s"],
                    "gain_pct": 100 * (paired(r, base) - 1),
                    "over_autometa_auto": paired(r, auto) if auto else None,
                    "gradient_agrees": not r["void"]})
    return out


def _fmt(x: Any, spec: str = ".0f", none: str = "–", unit: str = "") -> str:
    return none if x is None else format(x, spec) + unit


def _yes(x: bool | None) -> str:
    return "–" if x is None else ("yes" if x else "**no**")


GRADIENT_NOTE = (
    "The check runs in float64 on the first --check-tasks episodes. 'auto' contenders probe "
    "anew there (another dtype and shape), so they may check a different strategy than the "
    "one they were timed with; a timed 'auto' row is judged by the check of the strategy it "
    "ran (autometa-vmap or autometa-loop), and marked (void) if that one disagrees. "
    "Disagreement is not rounding: all contenders run in float64, and agreeing ones differ "
    "by < 1e-15.")


def report(result: dict[str, Any]) -> tuple[str, str]:
    """(terminal text, Markdown) of a result."""
    env = result["environment"]
    speed_rows = []
    for r in result["speed"]:
        auto = next((a for a in result["speed"] if a["model"] == r["model"]
                     and a["inner_steps"] == r["inner_steps"]
                     and a["contender"] == "autometa-auto"), None)
        speed_rows.append([r["model"], r["inner_steps"], r["contender"], r["strategy"],
                           _fmt(r["tasks_per_s"], ".1f") + (" (void)" if r["void"] else ""),
                           f"{_fmt(r['min'], '.1f')}–{_fmt(r['max'], '.1f')}",
                           ratio(auto and paired(auto, r)),
                           f"{r['first_step_s']:.2f}"])
    for key, why in result["unavailable"].items():
        speed_rows.append(["all", "–", key, "–", "not available", why, "–", "–"])
    for r in result.get("refused", []):
        speed_rows.append([r["model"], r["inner_steps"], r["contender"], "–", "refused",
                           r["error"], "–", "–"])
    speed_h = ["model", "inner steps", "contender", "strategy", "tasks/s (median)",
               "range", "autometa(auto) / this", "first step s"]
    proto_h = ["model", "inner steps", "prototype", "tasks/s", "unpatched", "unpatched tasks/s",
               "gain", "/ autometa(auto)", "first step s", "gradient agrees"]
    proto_rows = [[p["model"], p["inner_steps"], p["prototype"], f"{p['tasks_per_s']:.1f}",
                   p["baseline"], f"{p['baseline_tasks_per_s']:.1f}", f"{p['gain_pct']:+.1f}%",
                   ratio(p["over_autometa_auto"]), f"{p['first_step_s']:.1f}",
                   _yes(p["gradient_agrees"])] for p in result["prototypes"]]
    sum_h = ["model", "inner steps", "autometa tasks/s", "fastest peer", "peer tasks/s",
             "autometa / fastest peer", "target", "met", "overhead vs fastest reference",
             "overhead vs same-strategy reference", "≤ 5%", "episode sampling / step"]
    sum_rows = [[s["model"], s["inner_steps"],
                 f"{s['autometa_tasks_per_s']:.1f} ({s['autometa_strategy']})"
                 + ("" if s["autometa_gradient_agrees"] else " **void: wrong meta-gradient**"),
                 s["fastest_peer"] or "none", _fmt(s["fastest_peer_tasks_per_s"], ".1f"),
                 ratio(s['autometa_over_fastest_peer']),
                 f"≥ {s['peer_target']:g}x", _yes(s["peer_target_met"]),
                 _fmt(s["overhead_vs_fastest_reference_pct"], "+.1f", unit="%"),
                 _fmt(s["overhead_vs_same_strategy_reference_pct"], "+.1f", unit="%"),
                 _yes(s["overhead_target_met"]),
                 _fmt(s.get("sampling_pct_of_step"), ".2f", unit="%")] for s in result["summary"]]
    grad_h = ["model", "inner steps", "contender", "strategy", "max |g − g_ref| / max |g_ref|",
              "agrees"]
    grad_rows = [[g["model"], g["inner_steps"], g["contender"], g.get("strategy", "–"),
                  f"refused: {g['error']}" if "error" in g else f"{g['max_rel_error']:.1e}",
                  _yes(g["agrees"])] for g in result["gradients"]]
    samp_h = ["model", "inner steps", "sample one meta-batch (ms)", "autometa meta-step (ms)",
              "sampling / step", "target", "met"]
    samp_rows = [[s["model"], s["inner_steps"], f"{s['sample_ms']:.2f}",
                  f"{s['meta_step_ms']:.1f}", f"{s['percent_of_step']:.2f}%",
                  "≤ 5%" if s["model"] == "conv4" else "(info)",
                  _yes(s["percent_of_step"] <= 5) if s["model"] == "conv4" else "–"]
                 for s in result["sampling"]]
    settings = result["settings"]
    intro = (f"Second-order MAML meta-steps per second, {settings['repeats']} interleaved "
             f"repetitions of {settings['batches_per_rep']} meta-step(s) per workload "
             f"({settings['batches_per_rep_by_model']}), each run again until "
             f"{settings.get('min_seconds', 0):g} s had passed; Adam meta-lr {META_LR:g}; "
             f"on device {settings.get('device', 'cpu')}.")
    parts = [("Environment", describe_environment(env)), ("Setting", intro),
             ("Summary", (sum_h, sum_rows)), ("Throughput", (speed_h, speed_rows)),
             ("Meta-gradient agreement (one batch, same weights, float64, vs reference (loop))",
              (grad_h, grad_rows)),
             ("Episode sampling against a meta-step", (samp_h, samp_rows))]
    parts.insert(5, ("Note", GRADIENT_NOTE))
    if proto_rows:
        parts.append(("Prototyped patches (same run, same episodes)", (proto_h, proto_rows)))
    text, md = [], ["# MAML meta-training speed", ""]
    for title, body in parts:
        if isinstance(body, str):
            text += [f"{title}: {body}", ""]
            md += [f"**{title}.** {body}", ""]
        else:
            text += [title, text_table(*body), ""]
            md += [f"## {title}", "", markdown_table(*body), ""]
    md += [f"Command: `{env['command']}`", ""]
    return "\n".join(text), "\n".join(md)
