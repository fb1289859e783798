"""The image data path at the field's scale: decoding into the store, start-up from it, each
worker's memory beside it, and episodes gathered from it against a meta-step.

Two datasets of 84x84 RGB JPEGs in ``root/<class>/`` (``data_scale_images``), made under
``--work`` (default /tmp/w/databench, outside the repository) and deleted at the end:

* **mini-ImageNet's size**: 60,000 distinct JPEGs in 100 classes, split 64/16/20;
* **tiered-ImageNet's size**: 779,165 images in 608 classes (1,281-1,282 each), split
  351/97/160, as **hard links to 1,000 distinct JPEGs** (every image is still opened and
  decoded by the store's build; only the bytes repeat, from the page cache).

Measured on each (the ``image-folder`` task, 5-way 1-shot, 15 queries, 100 meta-val and
600 meta-test episodes, size 84), each in a fresh process (``data_scale_child``):

1. **build**: the task built with an empty cache, which decodes every image into the store;
   on mini-ImageNet also with one decoding thread instead of the library's
   ``min(8, cores)`` (the benchmark patches ``ThreadPoolExecutor`` in its own process),
   interleaved (default, 1; 1, default; ...), to see whether the threads help;
2. **start-up** from the built store: a fresh process building the task (target <= 5 s);
3. **memory**: a real search (``python -m autometa run``, 2 workers, 1 torch thread each,
   conv4, ProtoNet and MAML on mini / ProtoNet on tiered) while every process's
   /proc status is sampled 4 times a second (``data_scale_memory``): peak ``RssAnon``
   (private memory, beyond the shared store; target <= 300 MB per worker), ``RssFile``
   and the store's own resident pages; beside a bare ``import torch, autometa`` process;
4. **episodes** (mini): ``task.sample(4, g)`` interleaved with a conv4 MAML meta-step on 4
   such episodes (the paper's mini-ImageNet setting: 32 filters, 5 inner steps, inner lr
   0.01), median of the paired ratios (target: sampling <= 5 % of a meta-step); chunks of
   ``task.meta_test()`` gathered.

    python benchmarks/data_scale.py            # both datasets (~1 h on 2 cores)
    python benchmarks/data_scale.py --quick    # 2,000 and 3,000 images, a smoke test

Writes benchmarks/results/data_scale.json and .md (``--out``: a folder, or a .json file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data_scale_images import even_counts, remove_tree, write_folder, write_linked  # noqa: E402
from data_scale_memory import floor, run_sampled  # noqa: E402

CHILD = HERE / "data_scale_child.py"
TARGETS = {"startup_s": 5.0, "worker_anon_mb": 300.0, "sample_fraction": 0.05}
#: The datasets at full size: images, classes, distinct files (None: all), class split.
FULL = {
    "mini-imagenet": {"images": 60_000, "classes": 100, "distinct": None,
                      "val_fraction": 0.16, "test_fraction": 0.2},  # 64/16/20
    "tiered-imagenet": {"images": 779_165, "classes": 608, "distinct": 1_000,
                        "val_fraction": 0.16, "test_fraction": 0.263},  # 351/97/160
}
QUICK = {
    "mini-imagenet": {"images": 2_000, "classes": 25, "distinct": None,
                      "val_fraction": 0.2, "test_fraction": 0.2},
    "tiered-imagenet": {"images": 3_000, "classes": 24, "distinct": 100,
                        "val_fraction": 0.2, "test_fraction": 0.2},
}
#: MAML in the episodes' timing: Finn et al.'s mini-ImageNet setting.
MAML = {"inner_lr": 0.01, "inner_steps": 5, "meta_lr": 1e-3, "meta_batch_size": 4,
        "first_order": False, "strategy": "auto"}
CONV4 = {"channels": 32}
#: The searches fix these settings (the rest is sampled); the stage-by-stage memory
#: runs use them with the plugins' defaults for the rest.
SEARCHED: dict[str, dict[str, Any]] = {
    "maml": {"meta_batch_size": 4, "inner_steps": 1}, "protonet": {"meta_batch_size": 1},
    "conv4": {"channels": 64}}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def task_params(root: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"path": str(root), "size": args.size, "ways": 5, "shots": 1, "queries": 15,
            "val_episodes": args.val_episodes, "test_episodes": args.test_episodes,
            "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"]}


def child(what: str, params: dict[str, Any], cache: Path, log: Path,
          *extra: str) -> dict[str, Any]:
    """A ``data_scale_child`` run, sampled: its JSON result, wall time and memory."""
    before = load()
    run = run_sampled([sys.executable, str(CHILD), what, json.dumps(params), str(cache),
                       *extra], log=log)
    if run["returncode"] != 0:
        raise RuntimeError(f"{what} failed (exit {run['returncode']}); see {log}")
    result = json.loads(run["last_line"])
    main = run["processes"][0]
    return {**result, "wall_s": run["wall_s"], "load": before,
            "peak_mb": {k: round(v, 1) for k, v in main["peak"].items()}}


def clear_cache(cache: Path) -> str:
    """``autometa cache clear`` where it exists, else the folder deleted; how it was done."""
    done = subprocess.run([sys.executable, "-m", "autometa", "cache", "clear", "--cache-dir",
                           str(cache)], capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    return "autometa cache clear" if done.returncode == 0 else "deleted the folder"


def builds(name: str, params: dict[str, Any], data: dict[str, Any], args: argparse.Namespace,
           work: Path, log: Any) -> tuple[list[dict[str, Any]], Path]:
    """Store builds (default threads, and 1 thread on mini), interleaved; the cache of
    the last default build is kept (returned), the others deleted."""
    variants: list[int | None] = [None, 1] if data["distinct"] is None else [None]
    repeats = args.build_repeats if len(variants) > 1 else 1
    expected_s = data["images"] / args.rate_hint if args.rate_hint else 0.0
    runs, keep = [], work / f"cache-{name}"
    for rep in range(repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for k, threads in enumerate(order):
            last = rep == repeats - 1 and threads is None
            cache = keep if last else work / f"cache-{name}-{rep}-{threads or 'default'}"
            shutil.rmtree(cache, ignore_errors=True)
            extra = [] if threads is None else ["--threads", str(threads)]
            cut = args.max_build_minutes * 60
            if expected_s > cut:  # measure a prefix's rate instead (reported as such)
                extra += ["--max-seconds", str(cut / 5)]
            log(f"{name}: building the store ({threads or 'default'} decoding threads, "
                f"repeat {rep})")
            run = child("build", params, cache, work / f"build-{name}-{rep}-{k}.log", *extra)
            run.update(repeat=rep, threads=threads or f"default (min(8, {os.cpu_count()}))")
            if not run["cut"]:
                run["images_per_s"] = run["images"] / run["open_store_s"]
                run["disk_bytes"] = sum(p.stat().st_blocks * 512
                                        for p in (cache / "stores").iterdir())
            log(f"  {run.get('images_per_s', 0):.0f} images/s, "
                f"{run.get('open_store_s', run.get('build_s', 0)):.1f} s")
            runs.append(run)
            if not last:
                clear_cache(cache)
    return runs, keep


def thread_ratio(runs: list[dict[str, Any]]) -> float | None:
    """Median over repeats of (1-thread build time / default build time)."""
    by: dict[int, dict[str, float]] = {}
    for run in runs:
        if not run["cut"]:
            key = "one" if run["threads"] == 1 else "default"
            by.setdefault(run["repeat"], {})[key] = run["open_store_s"]
    pairs = [v["one"] / v["default"] for v in by.values() if len(v) == 2]
    return statistics.median(pairs) if pairs else None


def search(name: str, params: dict[str, Any], cache: Path, work: Path,
           args: argparse.Namespace, algorithms: str) -> dict[str, Any]:
    """A 2-worker search (the CLI), every process's memory sampled."""
    folder = work / f"search-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "autometa", "run", "--task", "image-folder",
               "--algorithms", algorithms, "--sources", "conv4", "--trials", str(args.trials),
               "--meta-steps", str(args.meta_steps), "--eval-every", str(args.eval_every),
               "--workers", "2", "--threads", "1", "--pruner", "none", "--top-k", "1",
               "--no-baselines",  # the searched trials only, as the runs before baselines
               "--cache-dir", str(cache), "--storage", f"sqlite:///{folder / 'study.db'}",
               "--artifacts", str(folder / "artifacts"), "--out", str(folder / "out"),
               "--study", name, "--no-progress"]
    for plugin in [*algorithms.split(","), "conv4"]:
        for key, value in SEARCHED[plugin].items():
            command += ["--param", f"{plugin}.{key}={value}"]
    for key, value in params.items():
        command += ["--task-param", f"{key}={value}"]
    before, launched = load(), datetime.now()
    run = run_sampled(command, log=folder / "search.log")
    run.update(load=before, load_after=load(), algorithms=algorithms, trials=args.trials,
               meta_steps=args.meta_steps)
    if run["returncode"] != 0:
        raise RuntimeError(f"the search on {name} failed; see {folder / 'search.log'}")
    import optuna

    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}"
                               ).trials
    starts = sorted(t.datetime_start for t in trials  # naive local times, as Optuna's
                    if t.datetime_start is not None)
    run["first_trial_after_s"] = (starts[0] - launched).total_seconds() if starts else None
    run["trial_states"] = [t.state.name for t in trials]
    board = sorted((folder / "out").glob("*.csv"))
    run["leaderboard"] = board[0].read_text() if board else None
    return run


def measure(name: str, data: dict[str, Any], args: argparse.Namespace,
            log: Any) -> dict[str, Any]:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    root = work / "images"
    remove_tree(root)
    counts = even_counts(data["images"], data["classes"])
    log(f"{name}: writing {data['images']} JPEGs in {data['classes']} classes")
    out: dict[str, Any] = {"dataset": name, "load_start": load()}
    if data["distinct"] is None:
        out["images"] = write_folder(root, counts, size=args.size)
    else:
        out["images"] = write_linked(root, counts, distinct=data["distinct"], size=args.size)
    params = task_params(root, data, args)
    out["task"] = params
    store_gb = data["images"] * 3 * args.size**2 / 1e9
    free_gb = shutil.disk_usage(args.work).free / 1e9
    out["disk_free_gb_before"] = round(free_gb, 1)
    if free_gb < store_gb * (1 + (data["distinct"] is None)) + 5:
        out["skipped"] = f"{free_gb:.1f} GB free, the store needs {store_gb:.1f} GB"
        remove_tree(root)
        return out
    out["builds"], cache = builds(name, params, data, args, work, log)
    out["thread_ratio"] = thread_ratio(out["builds"])
    if all(b["cut"] for b in out["builds"]):
        out["skipped"] = "the build was cut (see builds); no start-up or search measured"
    else:
        log(f"{name}: start-up from the built store")
        out["startup"] = [child("build", params, cache, work / f"startup-{k}.log")
                          for k in range(args.startup_repeats)]
        log(f"{name}: the SHA-256 of the folder that a search's prepare computes")
        out["input_hash"] = child("build", params, cache, work / "digest.log", "--digest")
        if name == "mini-imagenet" and not args.skip_episodes:
            log(f"{name}: episodes against a MAML meta-step")
            out["episodes"] = child(
                "episodes", params, cache, work / "episodes.log",
                "--repeats", str(args.episode_repeats), "--maml", json.dumps(args.maml),
                "--conv4", json.dumps(CONV4), "--chunks", "20")
        algorithms = "protonet,maml" if name == "mini-imagenet" else "protonet"
        out["stages"] = []
        for algorithm in algorithms.split(","):
            log(f"{name}: a worker's memory, stage by stage ({algorithm})")
            out["stages"].append(child(
                "stages", params, cache, work / f"stages-{algorithm}.log",
                "--algorithm", algorithm, "--params", json.dumps(SEARCHED[algorithm]),
                "--conv4", json.dumps(SEARCHED["conv4"]),
                "--tasks", str(SEARCHED[algorithm]["meta_batch_size"])))
        if name in args.search_on.split(","):
            log(f"{name}: a 2-worker search ({algorithms}), memory sampled")
            out["search"] = search(name, params, cache, work, args, algorithms)
    if not args.keep_data:
        out["cache_cleared_by"] = clear_cache(cache)
        out["images_removed_s"] = remove_tree(root)
    out["load_end"] = load()
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 and 3,000 images, tiny search: a smoke test (~1 min)")
    parser.add_argument("--datasets", default="mini-imagenet,tiered-imagenet")
    parser.add_argument("--work", type=Path, default=Path("/tmp/w/databench"),
                        help="where the images, stores and searches go (deleted after)")
    parser.add_argument("--keep-data", action="store_true", help="do not delete them")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="a folder (data_scale.json and .md in it) or a .json file")
    parser.add_argument("--size", type=int, default=None, help="image side (84; quick 28)")
    parser.add_argument("--build-repeats", type=int, default=None,
                        help="interleaved pairs of builds on mini (2; quick 1)")
    parser.add_argument("--startup-repeats", type=int, default=None, help="(3; quick 1)")
    parser.add_argument("--episode-repeats", type=int, default=None, help="(10; quick 2)")
    parser.add_argument("--trials", type=int, default=None, help="per search (4; quick 2)")
    parser.add_argument("--meta-steps", type=int, default=None, help="per trial (20; quick 2)")
    parser.add_argument("--max-build-minutes", type=float, default=25.0,
                        help="a build expected to take longer is measured on a prefix")
    parser.add_argument("--search-on", default=None,
                        help="datasets searched with 2 workers (both; quick: mini-imagenet)")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-episodes", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"build_repeats": (2, 1), "startup_repeats": (3, 1), "episode_repeats": (10, 2),
                "trials": (4, 2), "meta_steps": (20, 2), "size": (84, 28)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.search_on is None:
        args.search_on = "mini-imagenet" if quick else args.datasets
    if args.skip_search:
        args.search_on = ""
    args.eval_every = max(1, args.meta_steps // 2)
    args.val_episodes, args.test_episodes = (5, 20) if quick else (100, 600)
    args.maml = {**MAML, "inner_steps": 1} if quick else MAML
    args.rate_hint = None  # images/s of the mini build, for the tiered one's estimate
    args.work.mkdir(parents=True, exist_ok=True)

    from harness import environment, stderr_log

    started, say = time.perf_counter(), stderr_log(args.quiet)

    def log(message: str) -> None:
        say(f"[{time.perf_counter() - started:5.0f} s, load {load()[0]:.1f}] {message}")

    env = environment()
    sizes = QUICK if quick else FULL
    result: dict[str, Any] = {"environment": env, "targets": TARGETS, "quick": quick,
                              "settings": {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items()},
                              "floor_mb": floor(), "datasets": []}
    for name in args.datasets.split(","):
        measured = measure(name, sizes[name], args, log)
        result["datasets"].append(measured)
        rates = [b["images_per_s"] for b in measured.get("builds", [])
                 if b["threads"] != 1 and not b["cut"]]
        args.rate_hint = args.rate_hint or (statistics.median(rates) if rates else None)
    result["environment"]["load_average_end"] = load()

    from data_scale_report import report
    from harness import print_and_write

    text, markdown = report(result)
    out, name = args.out, "data_scale"
    if out.suffix == ".json":
        out, name = out.parent, out.stem
    print_and_write(name, result, text, markdown, out)
    return result


if __name__ == "__main__":
    main()
