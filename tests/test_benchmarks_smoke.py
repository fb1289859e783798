"""The benchmarks run end to end on tiny settings and write the tables they promise.

Structure only (files, tables, columns, statuses); never timings.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return lambda name: importlib.import_module(name)


def written(out: Path, name: str) -> tuple[dict, str]:
    assert sorted(p.name for p in out.iterdir() if p.stem == name) == [f"{name}.json",
                                                                       f"{name}.md"]
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def test_speed(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    speed = bench("speed")
    speed.main(["--models", "sinusoid,conv4", "--inner-steps", "1", "--repeats", "1",
                "--sinusoid-batches", "1", "--conv4-channels", "2", "--conv4-meta-batch", "2",
                "--conv4-side", "8", "--pool-classes", "10", "--min-seconds", "0",
                "--contenders", "autometa-auto,autometa-loop,reference-loop,higher",
                "--prototypes", "proto-fused-adam", "--device", "cpu", "--out", str(tmp_path),
                "--quiet"])
    result, md = written(tmp_path, "speed")
    assert result["settings"]["device"] == "cpu" and "on device cpu" in md
    assert {"environment", "settings", "summary", "speed", "gradients", "sampling",
            "prototypes", "unavailable"} <= set(result)
    assert result["environment"]["versions"]["torch"]
    keys = {(r["model"], r["contender"]) for r in result["speed"]}
    for model in ("sinusoid", "conv4"):
        assert {(model, "autometa-auto"), (model, "reference-loop"),
                (model, "proto-fused-adam")} <= keys
    assert all(r["tasks_per_s"] > 0 for r in result["speed"])
    sinusoid = [g for g in result["gradients"] if g["model"] == "sinusoid"]
    assert sinusoid and all(g["agrees"] for g in sinusoid)
    assert [s["model"] for s in result["summary"]] == ["sinusoid", "conv4"]
    assert [s["model"] for s in result["sampling"]] == ["sinusoid", "conv4"]
    for title in ("## Summary", "## Throughput", "## Meta-gradient agreement",
                  "## Episode sampling", "## Prototyped patches"):
        assert title in md
    assert "| model | inner steps | autometa tasks/s |" in md
    assert "Summary" in capsys.readouterr().out


def test_speed_beside_a_busy_neighbour(bench, tmp_path: Path) -> None:
    """--co-tenant times each workload alone, then beside a busy process, in one run."""
    speed = bench("speed")
    speed.main(["--models", "sinusoid", "--inner-steps", "1", "--repeats", "1",
                "--sinusoid-batches", "1", "--min-seconds", "0", "--co-tenant",
                "--contenders", "autometa-auto,reference-loop", "--out", str(tmp_path),
                "--quiet"])
    result, md = written(tmp_path, "speed")
    assert [s["model"] for s in result["summary"]] == ["sinusoid", "sinusoid (neighbour)"]
    assert [s["peer_target"] for s in result["summary"]] == [8.0, 8.0]  # the same target
    assert {(r["model"], r["contender"]) for r in result["speed"]} == {
        (m, c) for m in ("sinusoid", "sinusoid (neighbour)")
        for c in ("autometa-auto", "reference-loop")}
    assert "sinusoid (neighbour)" in md and result["settings"]["co_tenant"] is True


def test_memory(bench, tmp_path: Path) -> None:
    memory = bench("memory")
    memory.main(["--models", "sinusoid", "--inner-steps", "1", "--orders", "second",
                 "--contenders", "autometa-loop", "--conv4-channels", "2",
                 "--conv4-meta-batch", "2", "--no-tensors", "--out", str(tmp_path), "--quiet"])
    result, md = written(tmp_path, "memory")
    [row] = result["rows"]
    assert "error" not in row, row.get("error")
    assert row["contender"] == "autometa-loop" and row["steps"] == 1
    assert math.isfinite(row["step_peak_mb"]) and row["seconds"] > 0
    assert row["tensor_peak_mb"] is None  # --no-tensors: no second, sampled step
    assert "| model | inner steps | order | autometa-loop | auto chose |" in md


def test_memory_measure_sees_tensors_of_other_threads(bench) -> None:
    """The tensor peak counts what a worker thread allocates and frees inside the step."""
    import threading
    import time

    import torch

    memory = bench("memory")

    def step() -> None:
        def work() -> None:
            x = torch.ones(16 * 2**20)  # 64 MiB, alive for ~50 ms
            time.sleep(0.05)
            del x

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()

    peak = memory.tensor_peak_mb(step)
    if peak is None:
        pytest.skip("not glibc: no mallinfo2")
    assert 63 <= peak < 80


def test_sinusoid_accuracy(bench, tmp_path: Path) -> None:
    accuracy = bench("sinusoid_accuracy")
    accuracy.main(["--steps", "2", "--algorithms", "maml,metasgd", "--test-episodes", "5",
                   "--val-episodes", "2", "--out", str(tmp_path), "--quiet"])
    result, md = written(tmp_path, "sinusoid_accuracy")
    maml, metasgd = result["rows"]
    assert maml["status"] == "ok" and maml["test_episodes"] == 5
    assert math.isfinite(maml["test_mse"]) and maml["ci95"] > 0
    assert metasgd["status"] in {"ok", "not available", "failed"}
    assert "0.77 ± 0.11" in md and "0.53 ± 0.09" in md  # the published numbers beside
    assert "| algorithm | meta-steps |" in md


@pytest.mark.slow  # searches with one, then two worker processes
def test_scaling(bench, tmp_path: Path) -> None:
    scaling = bench("scaling")
    scaling.main(["--trials", "2", "--meta-steps", "2", "--repeats", "1",
                  "--out", str(tmp_path)])
    result, md = written(tmp_path, "scaling")
    assert [(r["workers"], r["trials"]) for r in result["runs"]] == [(1, 2), (2, 2)]
    assert all(r["trials_per_hour"] > 0 for r in result["runs"])
    assert result["summary"]["ratio"] > 0 and "2 workers / 1 worker" in md


def test_postgres_workers(bench, tmp_path: Path, postgres) -> None:
    workers = bench("postgres_workers")
    workers.main(["--trials", "6", "--workers", "1,2", "--repeats", "1",
                  "--heartbeat-seconds", "0", "--url", postgres.url("bench_smoke"),
                  "--out", str(tmp_path)])
    result, md = written(tmp_path, "postgres_workers")
    assert {"environment", "settings", "runs", "summary", "heartbeat"} <= set(result)
    assert result["environment"]["postgresql"].startswith("PostgreSQL")
    assert result["environment"]["versions"]["optuna"]
    assert [(r["workers"], r["trials"]) for r in result["runs"]] == [(1, 6), (2, 6)]
    for run in result["runs"]:
        assert run["ok"] and run["complete"] == 6 and run["states"] == {"COMPLETE": 6}
        assert sum(run["trials_per_worker"]) == 6 and run["trials_per_s"] > 0
        assert run["xact_commit"] > 0 and run["max_connections"] >= run["workers"]
        assert {"median", "p95", "max"} <= set(run["claim_ms"]) <= set(run["lock_wait_ms"])
    assert result["heartbeat"] is None  # --heartbeat-seconds 0 skips it
    assert [s["workers"] for s in result["summary"]] == [1, 2]
    assert "| workers | trials/s (range) |" in md and "## What limits it" in md


def _trial(number: int, value: float | None, *, steps: int = 0, seconds: float = 1.0,
           baseline: bool = False, state: str = "COMPLETE"):
    """A finished Optuna trial as a study stores it (meta-steps, wall, baseline mark)."""
    from datetime import datetime, timedelta

    import optuna

    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState[state], value=value,
        user_attrs={"meta_steps": steps, **({"baseline": True} if baseline else {})})
    trial.number, trial.datetime_start = number, datetime(2026, 1, 1)
    trial.datetime_complete = trial.datetime_start + timedelta(seconds=seconds)
    return trial


def test_search_efficiency_reach_keeps_baselines_apart(bench) -> None:
    """A baseline never reaches the target for a strategy nor costs it compute; a
    maximised metric (glyphs' accuracy) is handled; a search short of the target is
    unreached with its whole compute."""
    from types import SimpleNamespace

    from optuna.study import StudyDirection

    runs = bench("search_efficiency_runs")
    trials = [_trial(0, 0.9, baseline=True, seconds=5), _trial(1, 0.5, steps=10),
              _trial(2, None, steps=4, state="PRUNED"), _trial(3, 0.7, steps=10),
              _trial(4, 0.8, steps=10)]
    study = SimpleNamespace(direction=StudyDirection.MAXIMIZE, trials=trials)
    got = runs.reach(study, 0.7)
    assert got["reached"] and got["trials"] == 3 and got["meta_steps"] == 24
    assert got["wall_s"] == 3 and got["best"] == 0.7  # the baseline's 5 s kept apart
    assert got["baseline_trials"] == 1 and got["baseline_wall_s"] == 5
    assert got["baseline_best"] == 0.9 and got["baseline_reaches"]
    short = runs.reach(study, 0.85)  # only the baseline scores 0.85: unreached
    assert not short["reached"] and short["trials"] == 4 and short["meta_steps"] == 34
    assert short["best"] == 0.8 and short["baseline_reaches"]
    minimised = SimpleNamespace(direction=StudyDirection.MINIMIZE, trials=trials[1:])
    assert runs.reach(minimised, 0.5)["trials"] == 1
    assert not runs.reach(minimised, 0.5)["baseline_trials"]


def _row(strategy: str, seed: int, reached: bool, steps: int) -> dict:
    return {"strategy": strategy, "seed": seed, "reached": reached, "meta_steps": steps,
            "wall_s": steps / 10, "trials": steps // 10, "random_total_meta_steps": 1000,
            "baseline_reaches": False}


def test_search_efficiency_counts_unreached_seeds_as_such(bench) -> None:
    """Success rate over all seeds; compute over the succeeding ones only; an unreached
    seed loses every paired comparison with a seed that reached."""
    stats = bench("search_efficiency_stats")
    rows = [_row("random", s, True, 500) for s in range(10)]
    rows += [_row("cheap", s, s != 0, 10) for s in range(10)]  # seed 0 failed
    rows += [_row("never", s, False, 5) for s in range(10)]  # cheapest, never reaches
    summary = {s["strategy"]: s for s in stats.summarise(rows)}
    cheap, never = summary["cheap"], summary["never"]
    assert (cheap["successes"], cheap["seeds"], cheap["success_rate"]) == (9, 10, 0.9)
    assert cheap["success_low"] < 0.9 < cheap["success_high"] <= 1
    assert cheap["meta_steps"] == (10, 10, 10) and cheap["steps_vs_all"][1] == 0.01
    assert never["success_rate"] == 0 and all(math.isnan(q) for q in never["meta_steps"])
    pairs = {(p["a"], p["b"]): p for p in stats.paired(rows)}
    assert pairs["random", "cheap"]["b_cheaper"] == 9  # seed 0: cheap unreached, loses
    assert pairs["random", "cheap"]["a_cheaper"] == 1
    assert pairs["random", "never"]["a_cheaper"] == 10
    assert pairs["random", "never"]["wilcoxon_p"] < 0.01
    assert pairs["cheap", "never"]["ties"] == 1  # seed 0: both unreached
    assert pairs["cheap", "never"]["a_cheaper"] == 9
    assert stats.verdict(pairs["random", "never"], "holm_vs_random") == "random cheaper"
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # The pruner: the highest success rate first, not the cheapest on its successes.
    picked = [_row("tpe+median", s, s != 0, 10) for s in range(3)]
    picked += [_row("tpe+hyperband", s, True, 50) for s in range(3)]
    assert stats.choose_pruner(picked)[0] == "hyperband"


def test_search_efficiency_seed_sets(bench) -> None:
    se = bench("search_efficiency")
    assert se.parse_seeds(["10"], 0) == list(range(10))
    assert se.parse_seeds(["3"], 1000) == [1000, 1001, 1002]
    assert se.parse_seeds(["0,4,2"], 0) == se.parse_seeds(["0", "4", "2"], 0) == [0, 4, 2]
    assert se.parse_seeds(["5,"], 0) == [5]
    with pytest.raises(SystemExit, match="overlap"):
        se.main(["--seeds", "0,1", "--select-seeds", "1,2"])


@pytest.mark.slow  # a dozen real searches, one process
def test_search_efficiency(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    search_efficiency = bench("search_efficiency")
    results = tmp_path / "results"
    search_efficiency.main(["--tasks", "sinusoid", "--random-trials", "3",
                            "--related-trials", "2", "--meta-steps", "4", "--eval-every", "2",
                            "--seeds", "0,", "--select-seeds", "7,", "--processes", "1",
                            "--out", str(tmp_path / "runs"), "--results", str(results)])
    result, md = written(results, "search_efficiency_sinusoid")
    assert result["seeds"] == [0] and result["select_seeds"] == [7]
    assert result["scale"] == {"random_trials": 3, "related_trials": 2, "meta_steps": 4,
                               "eval_every": 2, "val_episodes": 100}
    assert {r["seed"] for r in result["rows"]} == {0}  # selection rows kept apart
    assert {r["seed"] for r in result["selection_rows"]} == {7}
    strategies = [row["strategy"] for row in result["rows"]]
    pruner = result["pruner"]
    assert strategies == ["random", "tpe", "tpe+median", "tpe+wilcoxon", "tpe+hyperband",
                          f"portfolio+{pruner}", f"warm+{pruner}", "top-k"]
    assert [r["strategy"] for r in result["selection_rows"]] == strategies[:5]
    random = result["rows"][0]
    assert random["reached"] and random["best"] == random["target"]
    assert random["total_trials"] == 3 and random["total_meta_steps"] > 0
    assert random["baseline_trials"] == 0  # a regression task has none
    assert all(row["meta_steps"] >= 0 and row["trials"] >= 1 for row in result["rows"])
    assert [s["strategy"] for s in result["summary"]] == strategies
    assert "Reported: [0]. Selection" in md and "[7]. Chosen pruner" in md
    assert "| strategy | success | 95% CI | meta-steps |" in md and "| tpe+hyperband |" in md
    assert "## Paired comparisons over seeds" in md and "load average at start" in md
    assert "| tpe+hyperband |" in capsys.readouterr().out
    # The tables are re-made from the JSON without running anything.
    again = tmp_path / "again"
    search_efficiency.main(["--from-json", str(results / "search_efficiency_sinusoid.json"),
                            "--results", str(again)])
    assert (again / "search_efficiency_sinusoid.md").read_text() == md


@pytest.mark.slow  # fresh processes for each build, a 2-worker search
def test_data_scale(bench, tmp_path: Path) -> None:
    data_scale = bench("data_scale")
    work = tmp_path / "work"
    data_scale.main(["--quick", "--work", str(work), "--out", str(tmp_path / "out.json"),
                     "--quiet"])
    result, md = written(tmp_path, "out")
    assert {"environment", "targets", "floor_mb", "datasets"} <= set(result)
    assert result["environment"]["versions"]["torch"] and result["floor_mb"]["RssAnon"] > 0
    mini, tiered = result["datasets"]
    assert mini["images"]["images"] == 2000 and tiered["images"]["hard_links"]
    assert [b["threads"] == 1 for b in mini["builds"]] == [False, True]
    assert mini["thread_ratio"] > 0 and all(b["images_per_s"] > 0 for b in mini["builds"])
    for dataset in (mini, tiered):
        assert dataset["startup"][0]["images"] == dataset["images"]["images"]
        assert dataset["input_hash"]["input_sha256_s"] > 0
        assert dataset["stages"] and "cache_cleared_by" in dataset
    workers = [p for p in mini["search"]["processes"] if p["role"] == "worker"]
    assert len(workers) == 2 and all(w["peak"]["RssAnon"] > 0 for w in workers)
    assert mini["search"]["trial_states"] == ["COMPLETE"] * 2
    assert 0 < mini["episodes"]["ratio_median"] and mini["episodes"]["sample_ms_median"] > 0
    assert not (work / "mini-imagenet" / "images").exists()  # the big files deleted
    for title in ("## Store build", "## Start-up from the built store", "## Memory of each "
                  "process", "## Where a worker's private memory goes", "## Episodes"):
        assert title in md


def test_gpu_check_skips_in_one_line_without_cuda() -> None:
    """`make gpu-check` on a machine without a GPU: one line, exit 0."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "no CUDA device: gpu-check skipped\n", "")


@pytest.mark.slow  # the dry run: pytest, a 2-worker search and speed.py, each a process
def test_gpu_check_dry_run_on_the_cpu(bench, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The check's every step, on the CPU at tiny sizes (the tests marked cuda run there)."""
    assert bench("gpu_check").main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check_dryrun_cpu.txt").read_text()
    assert text == capsys.readouterr().out.rsplit("wrote ", 1)[0]  # everything it printed
    for step in ("device", "tests", "search", "speed", "precision"):
        assert f"=== {step}: PASS" in text
    assert "recorded precision 'bf16'" in text and "bf16 - float32 meta-test accuracy" in text
    assert "'failures': 0, 'errors': 0, 'skipped': 0}" in text  # ran, none skipped
    assert "run by 2 worker process(es)" in text and "gpu-check PASSED in" in text
    result, _ = written(tmp_path, "speed_dryrun_cpu")
    assert result["settings"]["device"] == "cpu" and result["summary"]



def test_conv_efficiency(bench, tmp_path: Path) -> None:
    conv = bench("conv_efficiency")
    conv.main(["--inner-steps", "1", "--repeats", "1", "--min-seconds", "0",
               "--matmul-size", "32", "--conv4-channels", "2", "--conv4-meta-batch", "2",
               "--conv4-side", "8", "--pool-classes", "10", "--out", str(tmp_path)])
    result, md = written(tmp_path, "conv_efficiency")
    assert [r["contender"] for r in result["rows"]] == ["autometa", "plain"]
    for row in result["rows"]:
        assert row["gflop_per_step"] > 0 and row["matmul_gflops"] > 0
        assert row["fraction_of_peak"] > 0 and row["tasks_per_s"] > 0
    # The same layers and weights: the same convolution and matmul FLOPs.
    assert result["rows"][0]["gflop_per_step"] == result["rows"][1]["gflop_per_step"]
    assert "fraction of peak" in md
