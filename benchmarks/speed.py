"""MAML meta-training throughput: autometa against its peers and a hand-written reference.

Second-order MAML meta-steps (inner SGD, Adam meta-update, lr 1e-3), in tasks per second,
on two workloads:

* ``sinusoid``: the MAML paper's 1-40-40-1 ReLU MLP (autometa's ``mlp`` source, hidden 40,
  2 layers), meta-batch 25, 10 shots, 10 queries, inner lr 0.01;
* ``conv4``: autometa's ``conv4`` source (64 channels) on 5-way 1-shot 15-query episodes of
  random 1x28x28 images, meta-batch 32, inner lr 0.4 (MAML's Omniglot setting), sampled
  from an :class:`autometa.episodes.ClassPool` of 1,000 classes x 20 images.

Contenders, each on its own copy of the same initial weights and on the same episodes:
autometa (the ``maml`` plugin's ``meta_step`` with strategy ``auto``, ``vmap`` and
``loop``), a hand-written torch.func reference (``functional_call`` + ``grad``, episodes
vmapped or looped), higher (``innerloop_ctx``), TorchOpt (``MetaSGD`` and its functional
``sgd``), learn2learn (``MAML.clone``/``adapt``). A peer that is not installed is listed as
such; see benchmarks/requirements.txt and benchmarks/README.md for the peers' set-up.

Method: every contender first computes the meta-gradient of one batch from the same
weights, in float64, on the first ``--check-tasks`` episodes of a batch, compared with the
looped reference's (a contender that disagrees voids its timing). Then repetitions are
interleaved: in each one every contender (in a rotated order) runs the same batches, and
the median tasks/s over repetitions is reported. Ratios are paired: the median over
repetitions of the two contenders' rates in the same repetition, so that a slow spell
of the machine hits both; "fastest peer" is the peer autometa compares worst with.
Timings on a shared machine are noisy; ratios within one run are what to compare.

``--prototypes`` adds proposed patches to autometa (``proto-*``, below), built on its real
toolkit and timed beside the unpatched plugin.

    python benchmarks/speed.py                      # both workloads, 1 and 5 inner steps
    python benchmarks/speed.py --models sinusoid --repeats 9
    python benchmarks/speed.py --prototypes proto-compile,proto-fused-adam

Prints the tables and writes benchmarks/results/speed.json and speed.md (``--out``).
memory.py and sinusoid_accuracy.py reuse the workloads and the report helpers below.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from autometa import Episodes, Task, create_host
from autometa.episodes import ClassPool
from autometa.trial import TrialPlan, build

RESULTS = Path(__file__).parent / "results"
META_LR = 1e-3
#: In float64, a contender's meta-gradient must match the reference's to this relative
#: tolerance (max |g - g_ref| <= RTOL * max |g_ref|, over all parameters).
RTOL = 1e-9


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Hardware and versions, recorded with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "autometa", "higher", "torchopt", "learn2learn", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "autometa_commit": commit,
        "versions": versions,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def describe_environment(env: dict[str, Any]) -> str:
    v = env["versions"]
    peers = ", ".join(f"{k} {v[k] or 'not installed'}"
                      for k in ("higher", "torchopt", "learn2learn"))
    return (f"{env['cpu']}, {env['cores']} cores, torch {v['torch']} ({env['torch_threads']} "
            f"threads), Python {env['python']}; {peers}; autometa {env['autometa_commit']}; "
            f"load average at start {env['load_average_1m']:.2f}; {env['date']}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_results(name: str, payload: dict[str, Any], markdown: str, out: Path) -> list[Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    return paths


# --------------------------------------------------------------------------- workloads


class RandomImages(Task):
    """N-way K-shot episodes of random images from a :class:`ClassPool` (timing only)."""

    kind = "classification"

    def __init__(self, *, classes: int = 1000, per_class: int = 20, side: int = 28,
                 ways: int = 5, shots: int = 1, queries: int = 15, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.input_shape = (1, side, side)
        self.output_size = ways
        self.ways, self.shots, self.queries = ways, shots, queries
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(classes * per_class, 1, side, side, generator=g)  # (n, 1, H, W)
        y = torch.arange(classes).repeat_interleave(per_class)
        self.pool = ClassPool(x, y, range(classes), name="random images")
        self._fixed = self.sample(2, torch.Generator().manual_seed(seed + 1))

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self.pool.sample(n_tasks, self.ways, self.shots, self.queries, generator)

    def meta_val(self) -> Episodes:
        return self._fixed

    def meta_test(self) -> Episodes:
        return self._fixed


@dataclass
class Workload:
    """A model, a task and the MAML settings that the contenders share."""

    name: str
    task: Task
    source: str
    source_params: dict[str, Any]
    meta_batch: int
    inner_lr: float
    regression: bool

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The task's loss, written out so that the peers do not depend on autometa."""
        if self.regression:
            return F.mse_loss(pred, target)
        return F.cross_entropy(pred, target)

    def batches(self, n: int, seed: int = 0) -> list[Episodes]:
        g = torch.Generator().manual_seed(seed)
        return [self.task.sample(self.meta_batch, g) for _ in range(n)]


def make_workload(name: str, *, channels: int = 64, meta_batch: int | None = None,
                  pool_classes: int = 1000, side: int = 28) -> Workload:
    """``sinusoid`` (MLP 1-40-40-1) or ``conv4`` (random 28x28 5-way 1-shot 15-query)."""
    if name == "sinusoid":
        task = create_host().get("task", "sinusoid").load()(
            shots=10, queries=10, val_episodes=1, test_episodes=2)
        return Workload(name, task, "mlp", {"hidden": 40, "layers": 2},
                        meta_batch or 25, 0.01, regression=True)
    if name == "conv4":
        task = RandomImages(classes=pool_classes, side=side)
        return Workload(name, task, "conv4", {"channels": channels},
                        meta_batch or 32, 0.4, regression=False)
    raise ValueError(f"unknown workload {name!r}; expected 'sinusoid' or 'conv4'")


def make_autometa(work: Workload, inner_steps: int, strategy: str,
                  first_order: bool = False, seed: int = 0) -> Any:
    """autometa's MAML plugin, built the way a trial builds it (``autometa.trial.build``)."""
    plan = TrialPlan("maml", work.source,
                     {"inner_lr": work.inner_lr, "inner_steps": inner_steps, "meta_lr": META_LR,
                      "meta_batch_size": work.meta_batch, "first_order": first_order,
                      "strategy": strategy},
                     work.source_params)
    return build(create_host(), work.task, plan, seed=seed)


# --------------------------------------------------------------------------- contenders


class Contender:
    """One MAML implementation on its own copy of the model; ``step`` is one meta-update."""

    label = "?"
    strategy = "loop"

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        self.work, self.steps = work, steps
        self.model = copy.deepcopy(model)
        self.leaves = list(self.model.parameters())  # where the meta-gradient lands
        self.optimizer = torch.optim.Adam(self.leaves, lr=META_LR)

    def step(self, batch: Episodes) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulate(batch)
        self.optimizer.step()

    def accumulate(self, batch: Episodes) -> None:
        """Leave d(mean query loss)/d(initial weights) in ``.grad`` of ``self.leaves``."""
        raise NotImplementedError

    def meta_gradient(self) -> Tensor:
        return torch.cat([p.grad.flatten() for p in self.leaves])


def tasks_of(batch: Episodes):
    return zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y, strict=True)


class Autometa(Contender):
    """autometa's ``maml`` plugin, through ``MAML.meta_step``."""

    def __init__(self, model: nn.Module, work: Workload, steps: int, strategy: str) -> None:
        self.work, self.steps = work, steps
        self.algorithm = make_autometa(work, steps, strategy)
        self.algorithm.model.load_state_dict(model.state_dict())
        self.algorithm.model.to(next(model.parameters()).dtype)  # float64 in the check
        self.leaves = list(self.algorithm.model.parameters())
        self.label = f"autometa ({strategy})"
        self.strategy = strategy

    def step(self, batch: Episodes) -> None:
        self.algorithm.meta_step(batch)

    def resolved_strategy(self) -> str:
        """The strategy ``auto`` runs for the meta-gradient (the toolkit's fixed rule)."""
        if self.strategy != "auto":
            return self.strategy
        from autometa.inner_loop import choose_strategy

        return "auto→" + choose_strategy(self.algorithm.model, meta_gradient=True,
                                         first_order=self.algorithm.first_order)


class Reference(Contender):
    """Hand-written torch.func MAML: functional_call + grad, episodes vmapped or looped."""

    def __init__(self, model: nn.Module, work: Workload, steps: int, strategy: str) -> None:
        super().__init__(model, work, steps)
        self.params = dict(self.model.named_parameters())
        self.strategy = strategy
        self.label = f"reference ({strategy})"

    def accumulate(self, batch: Episodes) -> None:
        model, loss, lr = self.model, self.work.loss, self.work.inner_lr

        def query_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor,
                       qy: Tensor) -> Tensor:
            fast = params
            for _ in range(self.steps):
                g = grad(lambda p: loss(functional_call(model, p, (sx,)), sy))(fast)
                fast = {n: fast[n] - lr * g[n] for n in fast}
            return loss(functional_call(model, fast, (qx,)), qy)

        if self.strategy == "vmap":
            losses = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(
                self.params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        else:
            losses = torch.stack([query_loss(self.params, *t) for t in tasks_of(batch)])
        losses.mean().backward()


class Higher(Contender):
    """higher's ``innerloop_ctx`` with a differentiable SGD (its MAML example)."""

    label = "higher"

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        import higher

        super().__init__(model, work, steps)
        self.higher = higher
        self.inner = torch.optim.SGD(self.model.parameters(), lr=work.inner_lr)

    def accumulate(self, batch: Episodes) -> None:
        n, loss = len(batch), self.work.loss
        for sx, sy, qx, qy in tasks_of(batch):
            with self.higher.innerloop_ctx(self.model, self.inner,
                                           copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(loss(fmodel(sx), sy))
                (loss(fmodel(qx), qy) / n).backward()


class TorchOptMetaSGD(Contender):
    """TorchOpt's object-oriented ``MetaSGD`` (its maml_omniglot example)."""

    label = "torchopt (MetaSGD)"

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        import torchopt

        super().__init__(model, work, steps)
        self.torchopt = torchopt
        self.inner = torchopt.MetaSGD(self.model, lr=work.inner_lr)

    def accumulate(self, batch: Episodes) -> None:
        to, n, loss, net = self.torchopt, len(batch), self.work.loss, self.model
        net_state = to.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = to.extract_state_dict(self.inner, by="reference")
        for sx, sy, qx, qy in tasks_of(batch):
            for _ in range(self.steps):
                self.inner.step(loss(net(sx), sy))
            (loss(net(qx), qy) / n).backward()
            to.recover_state_dict(net, net_state)
            to.recover_state_dict(self.inner, opt_state)


class TorchOptFunctional(Contender):
    """TorchOpt's functional optimizer API (``torchopt.sgd`` + ``apply_updates``)."""

    label = "torchopt (functional)"

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        import torchopt

        super().__init__(model, work, steps)
        self.torchopt = torchopt
        self.names = [n for n, _ in self.model.named_parameters()]
        self.inner = torchopt.sgd(lr=work.inner_lr)

    def accumulate(self, batch: Episodes) -> None:
        n, loss, model = len(batch), self.work.loss, self.model

        def forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
            return functional_call(model, dict(zip(self.names, params, strict=True)), (x,))

        for sx, sy, qx, qy in tasks_of(batch):
            fast = tuple(self.leaves)
            state = self.inner.init(fast)
            for _ in range(self.steps):
                g = torch.autograd.grad(loss(forward(fast, sx), sy), fast, create_graph=True)
                updates, state = self.inner.update(g, state, inplace=False)
                fast = self.torchopt.apply_updates(fast, updates, inplace=False)
            (loss(forward(fast, qx), qy) / n).backward()


class Learn2Learn(Contender):
    """learn2learn's ``l2l.algorithms.MAML`` (``clone`` + ``adapt``)."""

    label = "learn2learn"

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        import learn2learn as l2l

        self.work, self.steps = work, steps
        self.maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=work.inner_lr,
                                        first_order=False)
        self.model = self.maml.module
        self.leaves = list(self.maml.parameters())
        self.optimizer = torch.optim.Adam(self.leaves, lr=META_LR)

    def accumulate(self, batch: Episodes) -> None:
        n, loss = len(batch), self.work.loss
        for sx, sy, qx, qy in tasks_of(batch):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(loss(learner(sx), sy))
            (loss(learner(qx), qy) / n).backward()


# --------------------------------------------------------------------------- prototypes
# Proposed patches to autometa, prototyped here on top of its real toolkit (the plugin and
# autometa/inner_loop.py are unchanged); timed beside the unpatched plugin with --prototypes.


class ProtoFusedAdam(Autometa):
    """Patch: the MAML plugin's meta-optimizer as ``Adam(..., fused=True)`` (CPU and CUDA)."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        super().__init__(model, work, steps, "auto")
        self.algorithm.optimizer = torch.optim.Adam(self.leaves, lr=META_LR, fused=True)
        self.label, self.strategy = "proto: fused Adam", "auto"


class ProtoCompiled(Autometa):
    """Patch: ``torch.compile`` around the toolkit's ``adapt_and_predict`` (vmap)."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        from autometa import inner_loop

        super().__init__(model, work, steps, "vmap")
        self.label, self.strategy = "proto: torch.compile", "vmap"
        self.predict = torch.compile(inner_loop.adapt_and_predict)

    def step(self, batch: Episodes) -> None:
        from autometa.inner_loop import parameters_of

        alg = self.algorithm
        pred = self.predict(alg.model, parameters_of(alg.model), batch.support_x,
                            batch.support_y, batch.query_x, alg.task.loss,
                            steps=alg.inner_steps, lr=alg.inner_lr,
                            first_order=alg.first_order, strategy="vmap")
        loss = alg.task.loss(pred, batch.query_y)
        alg.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        alg.optimizer.step()


#: Prototypes left out on a workload, and why.
PROTOTYPE_SKIP = {("proto-compile", "conv4"): "vmap is slower and wrong with BatchNorm there"}

PROTOTYPES: dict[str, type[Contender]] = {
    "proto-fused-adam": ProtoFusedAdam,
    "proto-compile": ProtoCompiled,
}


PEERS: dict[str, tuple[str, type[Contender]]] = {
    "higher": ("higher", Higher),
    "torchopt-metasgd": ("torchopt", TorchOptMetaSGD),
    "torchopt-functional": ("torchopt", TorchOptFunctional),
    "learn2learn": ("learn2learn", Learn2Learn),
}
ALL = ["autometa-auto", "autometa-vmap", "autometa-loop", "reference-vmap", "reference-loop",
       *PEERS]


def make_contender(key: str, model: nn.Module, work: Workload, steps: int) -> Contender:
    kind, _, strategy = key.partition("-")
    if kind == "autometa":
        return Autometa(model, work, steps, strategy)
    if kind == "reference":
        return Reference(model, work, steps, strategy)
    if key in PROTOTYPES:
        return PROTOTYPES[key](model, work, steps)
    return PEERS[key][1](model, work, steps)


def missing_peer(key: str) -> str | None:
    """Why a peer cannot run here (its import error), or None."""
    if key not in PEERS:
        return None
    try:
        __import__(PEERS[key][0])
    except Exception as exc:  # a peer may fail in odd ways on a new torch, not just ImportError
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return None


# --------------------------------------------------------------------------- measurements


def as_float64(batch: Episodes) -> Episodes:
    return Episodes(*(t.double() if t.is_floating_point() else t for t in
                      (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def refusal(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def check_gradients(model: nn.Module, work: Workload, steps: int, batch: Episodes,
                    keys: Sequence[str]) -> list[dict[str, Any]]:
    """Each contender's meta-gradient on ``batch`` from the same weights, all in float64.

    float64 leaves only implementation differences: in float32, rounding flips a few ReLU
    and max-pool decisions of the conv4 (random inputs), which moves the meta-gradient by
    ~1e-3 relative in every implementation alike and would hide a real disagreement.
    """
    model64, batch64 = copy.deepcopy(model).double(), as_float64(batch)
    reference = Reference(model64, work, steps, "loop")
    reference.accumulate(batch64)
    truth = reference.meta_gradient()
    scale = float(truth.abs().max())
    rows = []
    for key in keys:
        try:
            contender = make_contender(key, model64, work, steps)
            contender.step(batch64)
        except Exception as exc:  # e.g. autometa refusing vmap through BatchNorm
            rows.append({"model": work.name, "inner_steps": steps, "contender": key,
                         "strategy": "–", "max_rel_error": math.nan, "agrees": None,
                         "error": refusal(exc)})
            continue
        err = float((contender.meta_gradient() - truth).abs().max()) / scale
        strategy = (contender.resolved_strategy() if isinstance(contender, Autometa)
                    else contender.strategy)
        rows.append({"model": work.name, "inner_steps": steps, "contender": key,
                     "strategy": strategy, "max_rel_error": err, "agrees": err <= RTOL})
    return rows


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def time_contenders(contenders: dict[str, Contender], batches: Sequence[Episodes],
                    repeats: int, log: Callable[[str], None], warmup: dict[str, float],
                    refused: dict[str, str], min_seconds: float = 0.0
                    ) -> dict[str, list[float]]:
    """Tasks per second of each contender per repetition, repetitions interleaved.

    In a repetition a contender runs ``batches`` once, and again until ``min_seconds`` have
    passed (a fast contender would otherwise be timed over a few milliseconds, where the
    machine's noise decides). ``warmup`` receives the seconds of each contender's first
    meta-step; ``refused`` the error of a contender whose first step raised (it is then
    left out)."""
    for key in list(contenders):  # warm-up: one-off costs ('auto' probe, compilation)
        start = time.perf_counter()
        try:
            contenders[key].step(batches[0])
        except Exception as exc:  # e.g. autometa refusing vmap through BatchNorm
            refused[key] = refusal(exc)
            del contenders[key]
            continue
        warmup[key] = time.perf_counter() - start
    keys = list(contenders)
    tasks = sum(len(b) for b in batches)
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(repeats):
        order = keys[rep % len(keys):] + keys[: rep % len(keys)]  # rotate: spread drift
        for key in order:
            start, done = time.perf_counter(), 0
            while done == 0 or time.perf_counter() - start < min_seconds:
                for batch in batches:
                    contenders[key].step(batch)
                done += tasks
            rates[key].append(done / (time.perf_counter() - start))
        log(f"  repetition {rep + 1}/{repeats}: " +
            ", ".join(f"{k} {rates[k][-1]:.0f}" for k in keys))
    return rates


def sampling_cost(work: Workload, step_seconds: float, calls: int = 30) -> dict[str, Any]:
    """Median time to sample one meta-batch of episodes, against a meta-step."""
    g = torch.Generator().manual_seed(1)
    work.task.sample(work.meta_batch, g)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        work.task.sample(work.meta_batch, g)
        times.append(time.perf_counter() - start)
    sample = median(times)
    return {"sample_ms": 1e3 * sample, "meta_step_ms": 1e3 * step_seconds,
            "percent_of_step": 100 * sample / step_seconds}


def run_workload(work: Workload, steps: int, keys: Sequence[str], *, batches_per_rep: int,
                 repeats: int, check_tasks: int, log: Callable[[str], None],
                 min_seconds: float = 0.0) -> dict[str, Any]:
    model = make_autometa(work, steps, "loop").model  # the shared initial weights
    batches = work.batches(batches_per_rep, seed=steps)
    log(f"{work.name}, {steps} inner step(s): checking meta-gradients")
    grads = (check_gradients(model, work, steps, batches[0][:check_tasks], keys)
             if check_tasks else [])
    log(f"{work.name}, {steps} inner step(s): timing {', '.join(keys)}")
    contenders = {k: make_contender(k, model, work, steps) for k in keys}
    warmup: dict[str, float] = {}
    refused: dict[str, str] = {}
    rates = time_contenders(contenders, batches, repeats, log, warmup, refused,
                            min_seconds)
    disagree = {g["contender"] for g in grads if g["agrees"] is False}
    speed = []
    for key in [k for k in keys if k in contenders]:
        c = contenders[key]
        strategy = c.resolved_strategy() if isinstance(c, Autometa) else c.strategy
        if strategy.startswith("auto→") and grads:
            # 'auto' ran the strategy it chose: it is as right as that strategy is.
            chosen = strategy.rsplit("→", 1)[-1]
            (disagree.add if f"autometa-{chosen}" in disagree else disagree.discard)(key)
        speed.append({"model": work.name, "inner_steps": steps, "contender": key,
                      "strategy": strategy, "tasks_per_s": median(rates[key]),
                      "min": min(rates[key]), "max": max(rates[key]), "runs": rates[key],
                      "first_step_s": warmup[key], "void": key in disagree})
    return {"speed": speed, "gradients": grads,
            "refused": [{"model": work.name, "inner_steps": steps, "contender": k, "error": e}
                        for k, e in refused.items()]}


def paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over repetitions of a's tasks/s over b's in the same repetition."""
    return median([x / y for x, y in zip(a["runs"], b["runs"], strict=True)])


def summarise(speed: list[dict[str, Any]], sampling: dict[str, Any], fast_target: float,
              ) -> list[dict[str, Any]]:
    """Per workload and step count: autometa (auto) against the fastest peer and reference."""
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
        need = fast_target if model == "sinusoid" else 1.0
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


#: What each prototype is compared with: the unpatched contender it modifies.
PROTOTYPE_BASE = {"proto-fused-adam": "autometa-auto", "proto-compile": "autometa-vmap"}


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


# --------------------------------------------------------------------------- report


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
                           _fmt(auto and paired(auto, r), ".2f", unit="x"),
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
                   _fmt(p["over_autometa_auto"], ".2f", unit="x"), f"{p['first_step_s']:.1f}",
                   _yes(p["gradient_agrees"])] for p in result["prototypes"]]
    sum_h = ["model", "inner steps", "autometa tasks/s", "fastest peer", "peer tasks/s",
             "autometa / fastest peer", "target", "met", "overhead vs fastest reference",
             "overhead vs same-strategy reference", "≤ 5%", "episode sampling / step"]
    sum_rows = [[s["model"], s["inner_steps"],
                 f"{s['autometa_tasks_per_s']:.1f} ({s['autometa_strategy']})"
                 + ("" if s["autometa_gradient_agrees"] else " **void: wrong meta-gradient**"),
                 s["fastest_peer"] or "none", _fmt(s["fastest_peer_tasks_per_s"], ".1f"),
                 _fmt(s['autometa_over_fastest_peer'], '.2f', unit='x'),
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
             f"{settings.get('min_seconds', 0):g} s had passed; Adam meta-lr {META_LR:g}.")
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sinusoid,conv4")
    parser.add_argument("--inner-steps", default="1,5")
    parser.add_argument("--contenders", default=",".join(ALL),
                        help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="a contender's repetition runs its meta-steps again until this "
                             "long (fast contenders)")
    parser.add_argument("--sinusoid-batches", type=int, default=20,
                        help="meta-steps per repetition on sinusoid")
    parser.add_argument("--conv4-batches", type=int, default=1,
                        help="meta-steps per repetition on conv4")
    parser.add_argument("--conv4-channels", type=int, default=64)
    parser.add_argument("--conv4-meta-batch", type=int, default=32)
    parser.add_argument("--conv4-side", type=int, default=28, help="image height and width")
    parser.add_argument("--pool-classes", type=int, default=1000,
                        help="classes (x20 images) in the conv4 episode pool")
    parser.add_argument("--fast-target", type=float, default=5.0,
                        help="sinusoid target: autometa / fastest peer")
    parser.add_argument("--prototypes", default="", metavar="LIST",
                        help=f"also time proposed patches: {','.join(PROTOTYPES)}")
    parser.add_argument("--check-tasks", type=int, default=4,
                        help="episodes in the float64 gradient check (0: skip it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="speed", help="result file name")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    env = environment()
    wanted = [k for k in args.contenders.split(",") if k]
    wanted += [k for k in args.prototypes.split(",") if k and k not in wanted]
    unknown = [k for k in wanted if k not in ALL and k not in PROTOTYPES]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {ALL + list(PROTOTYPES)}")
    unavailable = {k: why for k in wanted if (why := missing_peer(k))}
    keys = [k for k in wanted if k not in unavailable]
    steps_list = [int(s) for s in args.inner_steps.split(",")]
    per_rep = {"sinusoid": args.sinusoid_batches, "conv4": args.conv4_batches}
    speed, grads, sampling, refused = [], [], [], []
    sampling_by = {}
    for name in args.models.split(","):
        run_keys = [k for k in keys if (k, name) not in PROTOTYPE_SKIP]
        work = make_workload(name, channels=args.conv4_channels,
                             meta_batch=args.conv4_meta_batch if name == "conv4" else None,
                             pool_classes=args.pool_classes, side=args.conv4_side)
        for steps in steps_list:
            res = run_workload(work, steps, run_keys, batches_per_rep=per_rep[name],
                               repeats=args.repeats, check_tasks=args.check_tasks, log=log,
                               min_seconds=args.min_seconds)
            speed += res["speed"]
            grads += res["gradients"]
            refused += res["refused"]
            auto = next((r for r in res["speed"] if r["contender"] == "autometa-auto"), None)
            if auto:
                cost = sampling_cost(work, work.meta_batch / auto["tasks_per_s"])
                sampling.append({"model": name, "inner_steps": steps, **cost})
                sampling_by[(name, steps)] = cost
    result = {
        "environment": env,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "batches_per_rep": "/".join(str(per_rep[m]) for m in args.models.split(",")),
                     "batches_per_rep_by_model": ", ".join(
                         f"{m}: {per_rep[m]}" for m in args.models.split(",")),
                     "meta_lr": META_LR, "gradient_rtol": RTOL},
        "unavailable": unavailable,
        "refused": refused,
        "summary": summarise(speed, sampling_by, args.fast_target),
        "prototypes": summarise_prototypes(speed),
        "speed": speed,
        "gradients": grads,
        "sampling": sampling,
    }
    text, md = report(result)
    print(text)
    for path in write_results(args.name, result, md, args.out):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
