"""What ``data_scale.py`` measures inside a fresh process; prints one JSON line.

    python benchmarks/data_scale_child.py build TASK_JSON CACHE [--threads N] [--max-seconds S]
    python benchmarks/data_scale_child.py episodes TASK_JSON CACHE [--repeats N] ...
    python benchmarks/data_scale_child.py stages TASK_JSON CACHE [--algorithm A] ...

* ``build``: the ``image-folder`` task built as the engine builds it (the plugin loaded
  through the plugin host), which builds the store if this cache has none, or opens it:
  the seconds to import torch and autometa, to build the task, and the part of it inside
  :func:`autometa.image_store.open_store`, with the store's progress over time.
  ``--threads N`` gives the store's builder N decoding threads instead of the library's
  ``min(8, cores)`` (the benchmark's own patch of ``ThreadPoolExecutor``, in this process
  only). ``--max-seconds S`` stops a build after S seconds and reports the rate so far
  (the library removes the partial store). ``--digest`` then times the SHA-256 of the
  image folder that the engine's ``prepare`` computes (``autometa.study.inputs.digest``).
* ``stages``: one process doing what a search's worker does (imports, the task, the model,
  meta-steps, meta-val and the first chunk of meta-test scored by
  ``autometa.trial.evaluate``), with one torch thread: its RssAnon after each stage and
  its peak during it (read 50 times a second).
* ``episodes``: ``task.sample(tasks, generator)`` (episodes gathered from the store)
  interleaved with a conv4 MAML meta-step on such episodes (the ``maml`` and ``conv4``
  plugins built by ``autometa.trial.build``, as a trial builds them), then chunks of the
  fixed meta-test episodes gathered (``task.meta_test()[i:i+k]``).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402


class Cut(Exception):
    """The build ran past ``--max-seconds``."""


def load_task_class() -> Any:
    from autometa import create_host

    return create_host().get("task", "image-folder").load()


def timed(owner: Any, name: str, timing: dict[str, float], key: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its seconds to ``timing[key]`` (this
    process only: where the time of a task's construction goes)."""
    inner = getattr(owner, name)
    timing[key] = 0.0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timing[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def build(params: dict[str, Any], cache: str, threads: int | None,
          max_seconds: float | None, digest: bool = False) -> dict[str, Any]:
    import torch

    import autometa  # noqa: F401
    import autometa.image_store as image_store
    from autometa import work

    imported = time.perf_counter()
    if threads is not None:  # the benchmark's patch: N decoding threads in this process
        from concurrent.futures import ThreadPoolExecutor

        image_store.ThreadPoolExecutor = (  # type: ignore[misc]
            lambda max_workers=None: ThreadPoolExecutor(max_workers=threads))
    cls = load_task_class()
    timing: dict[str, float] = {}
    module = sys.modules[cls.__module__]
    timed(module, "scan", timing, "scan_s")  # listing the folder
    timed(module, "open_store", timing, "open_store_s")  # the store: key, check or build
    timed(image_store.FileImages, "key", timing, "key_s")  # every file's stat (2x in a build)
    timed(module.ClassPool, "__init__", timing, "class_pools_s")  # each split's classes
    timed(module.FewShotTask, "set_pools", timing, "set_pools_s")  # the fixed episodes
    progress: list[tuple[float, int]] = []
    started = time.perf_counter()

    def reporter(what: str, done: int, total: int) -> None:
        now = time.perf_counter() - started
        progress.append((round(now, 3), done))
        if max_seconds is not None and now > max_seconds and done < total:
            raise Cut

    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                              "decode_threads": threads, "cut": False}
    try:
        with work.reporting(reporter):
            task = cls(**params, cache_dir=cache)
    except Cut:
        done = progress[-1][1]
        result.update(cut=True, decoded=done, build_s=progress[-1][0],
                      images_per_s=done / progress[-1][0])
    else:
        import gc

        from data_scale_memory import status_mb

        gc.collect()
        store = task.images.store
        result.update(memory_after_mb=status_mb(),  # the task built: what a worker holds
                      images=len(store), store_shape=list(store.shape),
                      store_bytes=store.path.stat().st_size, store_path=str(store.path),
                      describe_classes=task.describe().get("class_split"))
    finished = time.perf_counter()
    if digest:  # what the engine's prepare does before building the task, in every process
        from pathlib import Path

        from autometa.study.inputs import digest as sha256

        t = time.perf_counter()
        sha256(Path(params["path"]))
        result["input_sha256_s"] = time.perf_counter() - t
    result.update(import_s=imported - START, task_s=finished - started,
                  process_s=finished - START, **timing)
    step = max(1, len(progress) // 60)
    result["progress"] = progress[::step] + progress[-1:]
    return result


def episodes(params: dict[str, Any], cache: str, *, tasks: int, repeats: int,
             maml: dict[str, Any], conv4: dict[str, Any], chunk: int,
             chunks: int, engine_chunk: int | None) -> dict[str, Any]:
    import torch

    import autometa.image_store as image_store
    from autometa import create_host
    from autometa.study.trials import TrialPlan
    from autometa.trial import build as build_trial
    from autometa.trial import eval_chunk

    task = load_task_class()(**params, cache_dir=cache)
    gathered: dict[str, float] = {}
    timed(image_store.ImageStore, "gather", gathered, "s")  # the store's part of sample
    algorithm = build_trial(create_host(), task, TrialPlan("maml", "conv4", maml, conv4),
                            seed=0)
    algorithm.model.train()
    g = torch.Generator().manual_seed(0)
    algorithm.meta_step(task.sample(tasks, g))  # warm-up: first-call costs, pages mapped
    sample_s: list[float] = []
    step_s: list[float] = []
    gather_s: list[float] = []
    for rep in range(repeats):
        order = ("sample", "step") if rep % 2 == 0 else ("step", "sample")
        batch = task.sample(tasks, g)
        for what in order:
            t = time.perf_counter()
            if what == "sample":
                gathered["s"] = 0.0
                task.sample(tasks, g)
                sample_s.append(time.perf_counter() - t)
                gather_s.append(gathered["s"])
            else:
                algorithm.meta_step(batch)
                step_s.append(time.perf_counter() - t)
    test = task.meta_test()
    n = len(test)
    starts = [round(k * (n - chunk) / max(1, chunks - 1)) for k in range(chunks)]
    chunk_s = []
    for i in starts:
        t = time.perf_counter()
        test[i:i + chunk]
        chunk_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    big = test[0:engine_chunk or eval_chunk(test, task)]  # default: the engine's chunk
    engine_chunk_s = time.perf_counter() - t
    big_bytes = big.support_x.nbytes + big.query_x.nbytes
    from data_scale_memory import status_mb

    holding = status_mb()  # with the engine's chunk gathered
    ratios = [s / m for s, m in zip(sample_s, step_s, strict=True)]
    return {"tasks": tasks, "repeats": repeats, "maml": maml, "conv4": conv4,
            "torch_threads": torch.get_num_threads(),
            "sample_ms": [s * 1e3 for s in sample_s], "step_ms": [s * 1e3 for s in step_s],
            "sample_ms_median": statistics.median(sample_s) * 1e3,
            "gather_ms": [s * 1e3 for s in gather_s],
            "gather_ms_median": statistics.median(gather_s) * 1e3,
            "step_ms_median": statistics.median(step_s) * 1e3,
            "ratio_median": statistics.median(ratios), "ratios": ratios,
            "chunk": chunk, "chunk_ms": [s * 1e3 for s in chunk_s],
            "chunk_ms_median": statistics.median(chunk_s) * 1e3,
            "chunk_ms_per_episode": statistics.median(chunk_s) * 1e3 / chunk,
            "engine_chunk": len(big), "engine_chunk_ms": engine_chunk_s * 1e3,
            "engine_chunk_mb": big_bytes / 2**20, "test_episodes": n,
            "memory_with_engine_chunk_mb": holding}


def stages(params: dict[str, Any], cache: str, *, algorithm: str,
           algorithm_params: dict[str, Any], conv4: dict[str, Any], steps: int,
           tasks: int) -> dict[str, Any]:
    """RssAnon after each thing a worker does, and its peak during it (one torch thread,
    as the search's workers): what of a worker's private memory goes where."""
    import gc

    from data_scale_memory import PeakWatcher, status_mb

    watcher = PeakWatcher()
    marks: list[dict[str, Any]] = []

    def mark(stage: str) -> None:
        gc.collect()
        peak = watcher.take()
        marks.append({"stage": stage, "peak_anon": peak, **status_mb(),
                      "s": time.perf_counter() - START})

    mark("interpreter")
    import torch

    torch.set_num_threads(1)
    mark("import torch")
    import optuna  # noqa: F401

    import autometa.engine.worker  # noqa: F401
    from autometa import create_host
    from autometa.study.trials import TrialPlan
    from autometa.trial import build as build_trial
    from autometa.trial import eval_chunk, evaluate

    mark("import autometa's engine, optuna")
    task = load_task_class()(**params, cache_dir=cache)
    mark("task built (store mapped)")
    model = build_trial(create_host(), task,
                        TrialPlan(algorithm, "conv4", algorithm_params, conv4), seed=0)
    mark("model and algorithm built")
    model.model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model.meta_step(task.sample(tasks, g))
    mark(f"{steps} meta-steps")
    evaluate(model, task.meta_val(), task)
    mark(f"meta-val scored ({len(task.meta_val())} episodes)")
    test = task.meta_test()  # all of it, a chunk at a time (trial.eval_chunk), as the engine
    evaluate(model, test, task, split="meta-test")
    mark(f"meta-test scored ({len(test)} episodes, {eval_chunk(test, task)} at a time)")
    watcher.stop()
    return {"algorithm": algorithm, "algorithm_params": algorithm_params, "conv4": conv4,
            "steps": steps, "tasks": tasks, "stages": marks}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("build", "episodes", "stages"))
    parser.add_argument("task", help="the image-folder task's parameters, as JSON")
    parser.add_argument("cache", help="the cache directory (--cache-dir)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--digest", action="store_true",
                        help="build: then time the SHA-256 of the folder (the engine's)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--maml", default="{}", help="MAML's settings, JSON")
    parser.add_argument("--conv4", default="{}", help="conv4's settings, JSON")
    parser.add_argument("--algorithm", default="protonet", help="stages: the algorithm")
    parser.add_argument("--params", default="{}", help="stages: its settings, JSON")
    parser.add_argument("--steps", type=int, default=5, help="stages: meta-steps")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--engine-chunk", type=int, default=None,
                        help="episodes gathered at once (default: the engine's eval_chunk)")
    args = parser.parse_args(argv)
    params = json.loads(args.task)
    if args.what == "build":
        result = build(params, args.cache, args.threads, args.max_seconds, args.digest)
    elif args.what == "stages":
        result = stages(params, args.cache, algorithm=args.algorithm,
                        algorithm_params=json.loads(args.params),
                        conv4=json.loads(args.conv4), steps=args.steps, tasks=args.tasks)
    else:
        result = episodes(params, args.cache, tasks=args.tasks, repeats=args.repeats,
                          maml=json.loads(args.maml), conv4=json.loads(args.conv4),
                          chunk=args.chunk, chunks=args.chunks,
                          engine_chunk=args.engine_chunk)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
