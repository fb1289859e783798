"""Memory and time of one second-order MAML meta-step on a ~21M-parameter ViT: every
parameter meta-learned ("full") against LoRA adapters on the attention projections
("lora", ``autometa.adapters``: the features frozen, adapters and head meta-learned).

Workload: a randomly initialised transformers ``ViTModel`` (hidden 384, 12 layers, 6
heads, MLP 1536, 32x32 RGB images in 8x8 patches: 17 tokens; ViT-S/16's width and depth,
21.4M parameters) whose CLS token feeds a linear head; 5-way 1-shot 5-query episodes, a
meta-batch of 2, 1 and 3 inner SGD steps, second order, autometa's ``maml`` plugin with
strategy ``auto`` (the loop: the patch embedding is a convolution). Attention is "eager":
the CPU's fused scaled-dot-product attention has no double backward. LoRA: rank 8, alpha
16, targets "attention" (q, k, v of each layer: 221k parameters).

Method, each configuration in a fresh Python process, configurations interleaved
(full, lora, full, lora, ...): build the model and the algorithm, run one warm-up
meta-step on one episode (one-off imports, Adam's state), then

* CPU, **RSS**: the process's resident set size just before ONE meta-step on the full
  meta-batch (/proc/self/statm), and its peak after it (``getrusage`` ``ru_maxrss``): the
  step's peak is the difference. It counts allocator slack; "(≤)" marks a step that did not
  raise the high-water mark (the peak then is at most that).
  **tensors**: a second step while a thread samples glibc's ``mallinfo2`` (bytes malloc had
  handed out: every tensor, graph and gradient of every thread), the peak above what it
  held before (``benchmarks/memory.py``'s method).
  **process**: the peak RSS of the whole process (model, Adam's state and the step).
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` during the step minus
  ``memory_allocated`` before it; process: the peak allocation of the whole run.

Step time: the faster of the two measured steps (wall clock).

That the LoRA meta-gradient is the right one is tested, not measured here:
``tests/test_adapters.py::test_lora_maml_meta_gradient_equals_the_reference`` checks it
against a float64 reference written without peft or autometa's inner loop (second and
first order, vmap and loop).

    python benchmarks/lora_memory.py                  # 1 and 3 inner steps, 2 processes each
    python benchmarks/lora_memory.py --device cuda --repeats 3

Prints a table and writes benchmarks/results/lora_memory.json and lora_memory.md (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = ("full", "lora")
VIT = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
       "intermediate_size": 1536, "image_size": 32, "patch_size": 8, "num_channels": 3}
EPISODE = {"ways": 5, "shots": 1, "queries": 5, "meta_batch": 2}
LORA = {"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "attention"}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    import torch
    from memory import rss_kb, tensor_peak_mb
    from torch import nn
    from transformers import ViTConfig, ViTModel

    from autometa import Backbone, Episodes
    from autometa.metrics import loss_for
    from autometa_plugins.maml.algorithm import MAML

    class PooledCLS(nn.Module):
        def __init__(self, vit: nn.Module) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, 384)
            return self.vit(pixel_values=x).last_hidden_state[:, 0]

    class Task:  # what a GradientMetaLearner reads of its task: the loss
        kind = "classification"

        @staticmethod
        def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_for("classification", pred, target)

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    config = ViTConfig(**VIT, attn_implementation="eager")
    model = Backbone(PooledCLS(ViTModel(config, add_pooling_layer=False)),
                     nn.Linear(VIT["hidden_size"], EPISODE["ways"])).to(device)
    lora = LORA if spec["config"] == "lora" else {}
    algo = MAML(model, Task(), inner_steps=spec["inner_steps"], inner_lr=0.01,  # type: ignore[arg-type]
                meta_batch_size=EPISODE["meta_batch"], first_order=False,
                adapter="lora" if lora else "none", **lora)
    ways, shots, queries, tasks = (EPISODE[k] for k in ("ways", "shots", "queries",
                                                        "meta_batch"))
    g = torch.Generator().manual_seed(1)
    size = VIT["image_size"]
    episodes = Episodes(
        torch.rand(tasks, ways * shots, 3, size, size, generator=g).to(device),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous().to(device),
        torch.rand(tasks, ways * queries, 3, size, size, generator=g).to(device),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous().to(device),
    )
    cuda = device.type == "cuda"

    def step() -> float:
        start = time.perf_counter()
        algo.meta_step(episodes)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    algo.meta_step(episodes[:1])  # one-off costs: imports, Adam's state
    gc.collect()
    out: dict[str, Any] = {
        **spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = [step()]
        out["step_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        out["raised_high_water"] = True
        out["tensor_peak_mb"] = None
        seconds.append(step())
        out["process_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        baseline = rss_kb()
        seconds = [step()]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["step_peak_mb"] = (peak - baseline) / 1024
        out["raised_high_water"] = peak > high_water_before
        times: list[float] = []
        out["tensor_peak_mb"] = tensor_peak_mb(lambda: times.append(step()))
        seconds += times
        out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["seconds"] = min(seconds)
    out["threads"] = torch.get_num_threads()
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter and return its result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not last.startswith("{"):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(last)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration and inner steps (``"lora, 1 step"``): the median of each measure
    over its processes."""
    out: dict[str, dict[str, Any]] = {}
    for steps in sorted({r["inner_steps"] for r in rows}):
        for config in CONFIGS:
            mine = [r for r in rows if r["config"] == config and r["inner_steps"] == steps
                    and "error" not in r]
            if not mine:
                continue
            entry = out[label(config, steps)] = {
                "config": config, "inner_steps": steps, "processes": len(mine),
                "parameters": mine[0]["parameters"], "trained": mine[0]["trained"]}
            for key in ("step_peak_mb", "tensor_peak_mb", "process_peak_mb", "seconds"):
                values = [r[key] for r in mine if r.get(key) is not None]
                entry[key] = statistics.median(values) if values else None
    return out


def label(config: str, steps: int) -> str:
    return f"{config}, {steps} inner step{'s' if steps > 1 else ''}"


def report(result: dict[str, Any]) -> tuple[str, str]:
    from harness import describe_environment, markdown_table, text_table

    summary = result["summary"]

    def mb(value: float | None) -> str:
        return "–" if value is None else f"{value:,.1f}"

    def ratio(steps: int, key: str) -> str:
        full, lora = summary.get(label("full", steps)), summary.get(label("lora", steps))
        if not full or not lora or not full.get(key) or lora.get(key) is None:
            return "–"
        return f"{lora[key] / full[key]:.2f}"

    headers = ["configuration", "trained params", "step peak MB (RSS or CUDA)",
               "tensor peak MB", "process peak MB", "step s", "processes"]
    rows = []
    for steps in sorted({s["inner_steps"] for s in summary.values()}):
        rows += [[name, f"{s['trained']:,} of {s['parameters']:,}", mb(s["step_peak_mb"]),
                  mb(s["tensor_peak_mb"]), mb(s["process_peak_mb"]), f"{s['seconds']:.2f}",
                  s["processes"]] for name, s in summary.items() if s["inner_steps"] == steps]
        rows.append([f"lora / full, {steps} inner step{'s' if steps > 1 else ''}", "",
                     *(ratio(steps, k) for k in ("step_peak_mb", "tensor_peak_mb",
                                                 "process_peak_mb", "seconds")), ""])
    every = [[label(r["config"], r["inner_steps"]), r.get("error") or mb(r["step_peak_mb"])
              + ("" if r.get("raised_high_water", True) else " (≤)"),
              mb(r.get("tensor_peak_mb")), mb(r.get("process_peak_mb")),
              f"{r['seconds']:.2f}" if "seconds" in r else "–"] for r in result["rows"]]
    every_headers = ["configuration", "step peak MB", "tensor peak MB", "process peak MB",
                     "step s"]
    env = result["environment"]
    setup = (f"ViT {VIT}, eager attention; episodes {EPISODE}, second order, strategy auto; "
             f"LoRA {LORA}; device {result['device']}")
    load = (f"load average (1 min) before {env['load_average_1m']:.2f}, after "
            f"{result['load_average_after']:.2f}")
    method = ("Medians over fresh processes, configurations interleaved. Step peak: on the "
              "CPU, peak RSS (ru_maxrss) after one meta-step minus the RSS just before it; "
              "on CUDA, max_memory_allocated minus memory_allocated before it. Tensor peak "
              "(CPU): high point of malloc's bytes in use above the start, during a second "
              "step (mallinfo2 sampled every 0.2 ms). Process peak: the whole process (model, "
              "Adam's state, the step). Step s: the faster of the two steps. Gradients: "
              "tests/test_adapters.py::test_lora_maml_meta_gradient_equals_the_reference.")
    text = "\n".join([describe_environment(env), setup, load, "",
                      text_table(headers, rows), "", text_table(every_headers, every), "",
                      method])
    md = "\n".join(["# LoRA against full MAML: memory and time of one meta-step", "",
                    describe_environment(env) + ".", "", setup + ".", "", load + ".", "",
                    markdown_table(headers, rows), "", "Every process:", "",
                    markdown_table(every_headers, every), "", method])
    return text, md


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="processes per configuration")
    parser.add_argument("--inner-steps", default="1,3",
                        help="comma-separated inner-step counts (default 1,3)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from harness import environment, load_average, print_and_write, stderr_log

    log = stderr_log()
    env = environment(["transformers", "peft"])
    rows = []
    for steps in [int(s) for s in args.inner_steps.split(",")]:
        for k in range(args.repeats):
            for config in CONFIGS:
                log(f"[{k + 1}/{args.repeats}] {label(config, steps)} ...")
                rows.append(measure({"config": config, "device": args.device,
                                     "inner_steps": steps}))
                log(f"  {rows[-1]}")
    result = {"environment": env, "device": args.device, "vit": VIT, "episode": EPISODE,
              "lora": LORA, "rows": rows, "summary": summarise(rows),
              "load_average_after": load_average()}
    text, md = report(result)
    print_and_write("lora_memory", result, text, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
