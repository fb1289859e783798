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
                "--prototypes", "proto-fused-adam", "--out", str(tmp_path), "--quiet"])
    result, md = written(tmp_path, "speed")
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


@pytest.mark.slow  # eight search strategies, each a search of its own
def test_search_efficiency(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    search_efficiency = bench("search_efficiency")
    results = tmp_path / "results"
    search_efficiency.main(["--random-trials", "4", "--related-trials", "2", "--meta-steps",
                            "6", "--eval-every", "2", "--seeds", "0", "--processes", "1",
                            "--out", str(tmp_path / "runs"), "--results", str(results)])
    result, md = written(results, "search_efficiency_sinusoid")
    strategies = [row["strategy"] for row in result["rows"]]
    assert strategies[:5] == ["random", "tpe", "tpe+median", "tpe+wilcoxon", "tpe+hyperband"]
    assert strategies[5].startswith("portfolio+") and strategies[6].startswith("warm+")
    assert strategies[7] == "top-k"
    random = result["rows"][0]
    assert random["reached"] and random["best"] == random["target"]
    assert random["total_trials"] == 4 and random["total_meta_steps"] > 0
    assert all(row["meta_steps"] >= 0 and row["trials"] >= 1 for row in result["rows"])
    assert "steps ÷ random's 100" in md and "| tpe+hyperband |" in md
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
