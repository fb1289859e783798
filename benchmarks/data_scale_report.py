"""The tables of ``data_scale.py``'s result (one Markdown text, printed and written)."""

from __future__ import annotations

import statistics
from typing import Any

from harness import markdown_table


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("**yes**" if ok else "**no**")


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _header(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    floor = result["floor_mb"]
    return [
        "# The image data path at scale: store build, start-up, worker memory, episodes",
        "",
        f"{env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']} "
        f"({env['torch_threads']} threads), Python {env['python']}, autometa "
        f"{env['autometa_commit']}; {env['date']}; load average (1 min) "
        f"{env['load_average_1m']:.2f} at the start, {env['load_average_end'][0]:.2f} at the "
        "end (the machine is shared: loads below are 1/5/15-min averages at each step's "
        "start)." + (" **Quick run: tiny sizes, not a measurement.**" if result["quick"]
                     else ""),
        "",
        f"A bare `python -c 'import torch, autometa'` process: RssAnon "
        f"{floor['RssAnon']:.0f} MB, RssFile {floor['RssFile']:.0f} MB, VmRSS "
        f"{floor['VmRSS']:.0f} MB (the floor of every worker).",
    ]


def _data(datasets: list[dict[str, Any]]) -> list[str]:
    rows = []
    for d in datasets:
        i = d["images"]
        how = (f"{i['distinct']:,} distinct JPEGs + hard links" if i.get("hard_links")
               else "distinct JPEGs")
        rows.append([d["dataset"], f"{i['images']:,}", i["classes"], how,
                     f"{i['seconds']:.1f}", f"{i['images_per_s']:,.0f}",
                     f"{i['mean_file_bytes'] / 1e3:.1f}", d["load_start"]])
    return ["", "## Images written (84x84 RGB JPEG, quality 85, Pillow)", "",
            markdown_table(["dataset", "images", "classes", "files", "seconds", "images/s",
                            "mean file KB", "load"], rows)]


def _builds(datasets: list[dict[str, Any]]) -> list[str]:
    rows, notes = [], []
    for d in datasets:
        for b in d.get("builds", []):
            if b["cut"]:
                rows.append([d["dataset"], b["threads"], b["repeat"],
                             f"cut at {b['build_s']:.0f} s ({b['decoded']:,} decoded)",
                             f"{b['images_per_s']:,.0f}", "–", "–",
                             _mb(b["peak_mb"].get("RssAnon")), b["load"]])
                total = d["images"]["images"]
                notes.append(f"{d['dataset']}: the build was stopped after "
                             f"{b['build_s']:.0f} s; at {b['images_per_s']:,.0f} images/s "
                             f"the {total:,} images would take "
                             f"{total / b['images_per_s'] / 60:.0f} min (extrapolated).")
                continue
            rows.append([d["dataset"], b["threads"], b["repeat"], f"{b['open_store_s']:.1f}",
                         f"{b['images_per_s']:,.0f}", f"{b['store_bytes'] / 1e9:.2f}",
                         f"{b['disk_bytes'] / 1e9:.2f}", _mb(b["peak_mb"].get("RssAnon")),
                         b["load"]])
        if d.get("thread_ratio") is not None:
            notes.append(f"{d['dataset']}: one decoding thread takes "
                         f"**{d['thread_ratio']:.2f}x** as long as the library's default "
                         "(median of the paired repeats): the threads "
                         + ("help." if d["thread_ratio"] > 1.1 else "barely help."))
        if d.get("skipped"):
            notes.append(f"{d['dataset']}: {d['skipped']}.")
    return ["", "## Store build (the task built on an empty cache: every image decoded)", "",
            markdown_table(["dataset", "decoding threads", "repeat", "build s (open_store)",
                            "images/s", "store GB", "on disk GB", "builder peak RssAnon MB",
                            "load"], rows), "", *[f"* {n}" for n in notes]]


def _startup(datasets: list[dict[str, Any]], target: float) -> list[str]:
    rows = []
    for d in datasets:
        runs = d.get("startup")
        if not runs:
            continue
        walls = [r["wall_s"] for r in runs]
        wall = statistics.median(walls)
        after = runs[0].get("memory_after_mb", {})
        parts = [f"{statistics.median(r[k] for r in runs):.2f}"
                 for k in ("import_s", "task_s", "scan_s", "key_s", "open_store_s",
                           "class_pools_s", "set_pools_s")]
        rows.append([d["dataset"], f"{wall:.2f} ({min(walls):.2f}–{max(walls):.2f})", *parts,
                     _mb(after.get("RssAnon")), _met(wall <= target), runs[0]["load"]])
    hashes = [f"{d['dataset']}: {d['input_hash']['input_sha256_s']:.1f} s"
              for d in datasets if d.get("input_hash")]
    searches = [f"{d['dataset']}: {d['search']['first_trial_after_s']:.1f} s"
                for d in datasets if d.get("search") and d["search"].get("first_trial_after_s")]
    return ["", f"## Start-up from the built store (a fresh process; target <= {target:g} s)",
            "",
            "Seconds, medians over the runs. The task's construction, in parts (timed by "
            "wrapping the library's functions in the benchmark's process): `scan` lists the "
            "folder; `FileImages.key` stats every file (inside `open_store`, which also "
            "checks the store); `ClassPool`: the three splits' pools (each class's members "
            "found); `set_pools` draws the fixed meta-val/meta-test episodes.", "",
            markdown_table(["dataset", "process wall (median, range)", "imports",
                            "task built", "scan", "key", "open_store", "ClassPool",
                            "set_pools", "RssAnon with the task built MB", "met", "load"],
                           rows), "",
            "A search does more before its first trial: the engine's `prepare` hashes every "
            "file of the image folder (SHA-256, `autometa.study.inputs.digest`) in the "
            "search's process and again in each worker, before building the task. That hash "
            f"took {'; '.join(hashes) or '–'} (one process, files in the page cache). From "
            "launching `autometa run --workers 2` to its first trial's start: "
            f"{'; '.join(searches) or '–'}."]


def _memory(datasets: list[dict[str, Any]], floor: dict[str, float],
            target: float) -> list[str]:
    rows = []
    for d in datasets:
        run = d.get("search")
        if not run:
            continue
        for p in run["processes"]:
            if p["role"] not in ("main", "worker"):
                continue
            peak = p["peak"]
            name = "supervisor (the CLI)" if p["role"] == "main" else p["name"]
            ok = peak["RssAnon"] <= target if p["role"] == "worker" else None
            rows.append([d["dataset"], name, _mb(peak["RssAnon"]), _mb(peak["RssFile"]),
                         _mb(peak.get("store_rss")), _mb(peak["RssShmem"]),
                         _mb(peak["VmRSS"]), _mb(peak["VmHWM"]), _mb(peak["Pss"]),
                         _mb(peak.get("beyond_store")), _met(ok), run["load"]])
    rows.append(["–", "bare `import torch, autometa`", _mb(floor["RssAnon"]),
                 _mb(floor["RssFile"]), "0", _mb(floor["RssShmem"]), _mb(floor["VmRSS"]),
                 _mb(floor["VmHWM"]), _mb(floor["Pss"]), "–", "–", "–"])
    searches = [f"{d['dataset']}: {d['search']['algorithms']} + conv4, "
                f"{d['search']['trials']} trials x {d['search']['meta_steps']} meta-steps, "
                f"{d['search']['wall_s']:.0f} s" for d in datasets if d.get("search")]
    return ["", "## Memory of each process of a 2-worker search (peaks, MB; sampled 4/s)", "",
            "RssAnon is private memory (beyond the shared store); RssFile holds the store's "
            "pages and the shared libraries; 'store pages' are the store's own resident "
            "pages (from smaps, once a second); VmHWM is the kernel's peak of VmRSS; "
            "'beyond store' = VmRSS - store pages. Target: each worker's RssAnon <= "
            f"{target:g} MB. Searches: {'; '.join(searches) or 'none'}.", "",
            markdown_table(["dataset", "process", "RssAnon", "RssFile", "store pages",
                            "RssShmem", "VmRSS", "VmHWM", "Pss", "beyond store", "met",
                            "load"], rows)]


def _episodes(datasets: list[dict[str, Any]], target: float) -> list[str]:
    out = []
    for d in datasets:
        e = d.get("episodes")
        if not e:
            continue
        m = e["maml"]
        ratio = e["ratio_median"]
        out += ["", f"## Episodes gathered vs a MAML meta-step ({d['dataset']}; target: "
                f"sampling <= {target:.0%} of a step)", "",
                f"`task.sample({e['tasks']}, g)` (5-way 1-shot 15-query, gathered from the "
                f"store) against `maml.meta_step` on 4 such episodes (conv4, "
                f"{e['conv4']['channels']} filters, {m['inner_steps']} inner steps, second "
                f"order), interleaved, {e['repeats']} repeats, {e['torch_threads']} torch "
                "threads.", "",
                markdown_table(
                    ["sample ms (median)", "of which gather ms", "meta-step ms (median)",
                     "sample / step (paired median)", "met",
                     f"meta_test()[i:i+{e['chunk']}] ms (median)", "ms per episode",
                     f"meta_test()[0:{e['engine_chunk']}] ms",
                     "its float32 MB", "RssAnon holding it MB", "load"],
                    [[f"{e['sample_ms_median']:.1f}", f"{e['gather_ms_median']:.1f}",
                      f"{e['step_ms_median']:.0f}",
                      f"{ratio:.2%}", _met(ratio <= target), f"{e['chunk_ms_median']:.1f}",
                      f"{e['chunk_ms_per_episode']:.2f}", f"{e['engine_chunk_ms']:.0f}",
                      f"{e['engine_chunk_mb']:,.0f}",
                      _mb(e["memory_with_engine_chunk_mb"]["RssAnon"]), e["load"]]])]
    return out


def report(result: dict[str, Any]) -> tuple[str, str]:
    """(terminal text, Markdown): the same tables."""
    targets, datasets = result["targets"], result["datasets"]
    lines = [*_header(result), *_data(datasets), *_builds(datasets),
             *_startup(datasets, targets["startup_s"]),
             *_memory(datasets, result["floor_mb"], targets["worker_anon_mb"]),
             *_stages(datasets, targets["worker_anon_mb"]),
             *_episodes(datasets, targets["sample_fraction"])]
    markdown = "\n".join(lines)
    return markdown, markdown


def _stages(datasets: list[dict[str, Any]], target: float) -> list[str]:
    rows = []
    for d in datasets:
        for run in d.get("stages", []):
            before = 0.0
            for mark in run["stages"]:
                rows.append([d["dataset"], run["algorithm"], mark["stage"],
                             _mb(mark["RssAnon"]), f"{mark['RssAnon'] - before:+,.0f}",
                             _mb(mark["peak_anon"]), _mb(mark["RssFile"])])
                before = mark["RssAnon"]
    if not rows:
        return []
    return ["", "## Where a worker's private memory goes (one process doing what a worker "
            "does, 1 torch thread; MB)", "",
            "RssAnon after each stage (garbage collected) and its peak during the stage "
            f"(read 50 times a second), against the target of {target:g} MB per worker.", "",
            markdown_table(["dataset", "algorithm", "stage", "RssAnon after", "change",
                            "peak during", "RssFile after"], rows)]
