"""The searches of the search-efficiency benchmark: each strategy a real ``autometa.search``
on one task and one seed, run in chunks until its best ranked *searched* trial reaches the
target, and the compute it took.

Baseline trials (``nearest-centroid``, ``linear-probe``, ``linear-svm`` on ``raw``: a
classification search queues them first, outside its budget) are handled explicitly:
they never count towards reaching the target (the target is what searching finds; a
baseline that already meets it is reported on its own, :func:`reach`'s
``baseline_reaches``), and their cost (0 meta-steps, some wall seconds: the same in every
strategy's study) is kept apart from the strategy's compute.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

#: Strategies whose only difference is the pruner: the selection seeds run these (and
#: random search, for the target) to choose the portfolio's and warm start's pruner.
PRUNED_STRATEGIES = ("tpe", "tpe+median", "tpe+wilcoxon", "tpe+hyperband")
CHUNK = 5  # searched trials per resume while looking for the target


def trial_cost(trial: Any) -> tuple[int, float]:
    """(meta-steps run, wall seconds) of one finished Optuna trial."""
    steps = int(trial.user_attrs.get("meta_steps") or 0)  # recorded by the worker
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else 0.0
    return steps, wall


def reach(study: Any, target: float | None) -> dict[str, Any]:
    """Compute of the searched trials up to the first one after which the best ranked
    searched trial scores ``target`` or better (``reached`` True), or of all of them
    (``reached`` False; ``target`` None: never reached, the whole run).

    Baseline trials are counted apart: ``baseline_trials``, ``baseline_wall_s`` and
    ``baseline_best`` (their best ranked score), ``baseline_reaches`` (that best meets
    ``target``). ``best`` is the best ranked searched score (inf/-inf if none).
    """
    from autometa.study.baselines import is_baseline
    from autometa.study.trials import ranked

    sign = 1.0 if study.direction.name == "MINIMIZE" else -1.0  # work on sign * value
    done = sorted((t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")),
                  key=lambda t: t.number)
    base = [t for t in done if is_baseline(t)]
    base_scores = [sign * float(t.value) for t in base if ranked(t)]
    base_best = sign * min(base_scores) if base_scores else None

    def meets(key: float) -> bool:  # the tolerance: float32 sums of episode scores
        return target is not None and key <= sign * target + 1e-6 * abs(target)

    result: dict[str, Any] = {
        "baseline_trials": len(base), "baseline_wall_s": sum(trial_cost(t)[1] for t in base),
        "baseline_best": base_best,
        "baseline_reaches": bool(base_scores) and meets(min(base_scores)),
        "direction": study.direction.name.lower()}
    steps, wall, best = 0, 0.0, float("inf")
    searched = [t for t in done if not is_baseline(t)]
    for n, trial in enumerate(searched, start=1):
        s, w = trial_cost(trial)
        steps, wall = steps + s, wall + w
        if ranked(trial):
            best = min(best, sign * float(trial.value))
        if meets(best):
            return {**result, "reached": True, "trials": n, "meta_steps": steps,
                    "wall_s": wall, "best": sign * best}
    return {**result, "reached": False, "trials": len(searched), "meta_steps": steps,
            "wall_s": wall, "best": sign * best}


def load_reach(storage: str, study: str, target: float | None) -> dict[str, Any]:
    import optuna

    return reach(optuna.load_study(study_name=study, storage=storage), target)


def run_strategy(name: str, settings: dict[str, Any], *, target: float, cap: int
                 ) -> dict[str, Any]:
    """Run ``settings`` in chunks of :data:`CHUNK` searched trials until ``target`` or
    ``cap`` searched trials (``n_trials`` counts searched trials only)."""
    import autometa

    n = 0
    while True:
        n = min(cap, n + CHUNK)
        autometa.search(**settings, n_trials=n)
        result = load_reach(settings["storage"], settings["study_name"], target)
        if result["reached"] or n >= cap:
            return {"strategy": name, **result}


def one_seed(args: Any, spec: dict[str, Any], task: str, seed: int, role: str,
             pruner: str | None) -> list[dict[str, Any]]:
    """The rows of one task (``spec``: its space and scale) and seed. ``role`` "select":
    random search and the :data:`PRUNED_STRATEGIES` (to choose a pruner); "report":
    those, then the portfolio and warm start with ``pruner`` (chosen on the selection
    seeds) and top-k. Warnings are silenced while it runs (and only then: with
    ``--processes 1`` it runs in the caller's process)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _one_seed(args, spec, task, seed, role, pruner)
    finally:
        logging.disable(before)


def _one_seed(args: Any, spec: dict[str, Any], task: str, seed: int, role: str,
              pruner: str | None) -> list[dict[str, Any]]:
    import torch

    import autometa

    torch.set_num_threads(1)
    out = Path(args.out) / f"{task}-{role}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'studies.db'}"
    base = {"task": task, "task_params": spec["task_params"],
            "algorithms": spec["algorithms"], "sources": spec["sources"],
            "algorithm_params": spec["algorithm_params"],
            "source_params": spec["source_params"], "meta_steps": spec["meta_steps"],
            "eval_every": spec["eval_every"], "seed": seed, "storage": storage,
            "artifacts": str(out / "artifacts"), "top_k": 1, "keep": 1, "threads": 1,
            "baselines": True}

    def settings(study: str, **more: Any) -> dict[str, Any]:
        return {**base, "study_name": study, **more}

    cap = spec["random_trials"]
    autometa.search(**settings("random", sampler="random", pruner="none"), n_trials=cap)
    whole = load_reach(storage, "random", None)
    target = whole["best"]
    rows = [{**load_reach(storage, "random", target), "strategy": "random",
             "total_trials": whole["trials"], "total_meta_steps": whole["meta_steps"],
             "total_wall_s": whole["wall_s"]}]
    for name in PRUNED_STRATEGIES:
        rows.append(run_strategy(name, settings(name, pruner=name.partition("+")[2] or "none"),
                                 target=target, cap=cap))
    if role == "report":
        assert pruner is not None, "the report seeds need the pruner chosen on others"
        rows.append(run_strategy(f"portfolio+{pruner}",
                                 settings("portfolio", pruner=pruner, initial="portfolio"),
                                 target=target, cap=cap))
        related = related_study(args, spec, seed, base, pruner)
        rows.append(run_strategy(f"warm+{pruner}",
                                 settings("warm", pruner=pruner, warm_start=[related]),
                                 target=target, cap=cap))
        rows.append(top_k(settings, target=target, eval_every=spec["eval_every"], most=cap))
    for row in rows:
        row.update(task=task, seed=seed, role=role, target=target,
                   random_total_meta_steps=whole["meta_steps"],
                   random_total_wall_s=whole["wall_s"])
    return rows


def related_study(args: Any, spec: dict[str, Any], seed: int, base: dict[str, Any],
                  pruner: str) -> str:
    """A TPE study of the related task (the task spec's ``related``), in its own storage;
    returns ``"study@url"`` for ``warm_start``."""
    import autometa

    related = dict(spec["related"])
    offset = related.pop("seed_offset", 0)
    url = base["storage"].replace("studies.db", "related.db")
    autometa.search(**{**base, "storage": url, "seed": seed + offset,
                       "task_params": {**spec["task_params"], **related}},
                    study_name="related", pruner=pruner, n_trials=spec["related_trials"])
    return f"related@{url}"


def top_k(settings: Any, *, target: float, eval_every: int, most: int) -> dict[str, Any]:
    """Egele et al. (2023): N random configurations for one interval, then the best 3
    continued to the full budget (warm start from the short study, whose baselines it
    does not take); N = 30 %, 60 % and 100 % of ``most`` until the target is reached (the
    short trials are shared: each round adds to them)."""
    short = settings("short", sampler="random", pruner="none", meta_steps=eval_every)
    result: dict[str, Any] = {}
    import autometa

    for n in sorted({max(3, round(most * f)) for f in (0.3, 0.6, 1.0)}):
        autometa.search(**short, n_trials=n)
        first = load_reach(short["storage"], "short", None)
        full = settings(f"top3-of-{n}", pruner="none", warm_start=["short"])
        autometa.search(**full, n_trials=3)
        second = load_reach(full["storage"], full["study_name"], target)
        result = {**second, "strategy": "top-k",
                  "trials": first["trials"] + second["trials"],
                  "meta_steps": first["meta_steps"] + second["meta_steps"],
                  "wall_s": first["wall_s"] + second["wall_s"],
                  "baseline_trials": first["baseline_trials"] + second["baseline_trials"],
                  "baseline_wall_s": first["baseline_wall_s"] + second["baseline_wall_s"]}
        if result["reached"]:
            break
    return result
