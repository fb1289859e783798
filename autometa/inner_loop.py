"""The inner-loop toolkit shared by gradient-based meta-algorithms, on torch.func.

Parameters are handled functionally, as a ``{name: tensor}`` dict evaluated through
``torch.func.functional_call``. Adaptation is differentiable end to end: the meta-gradient
flows through the inner SGD steps (second order) unless ``first_order`` treats the inner
gradients as constants. Episodes are processed either all at once with ``torch.func.vmap``
(``"vmap"``) or one at a time (``"loop"``); both give the same values and gradients,
with one exception: PyTorch's vmap batching rule for the double backward of BatchNorm is
wrong (functorch issue #534), so a second-order meta-gradient through a BatchNorm layer in
training mode is computed with the loop ("auto") or refused ("vmap").
Which is faster depends on the model and the device (vmap was ~10x faster than the loop for
a small MLP on a 2-core CPU, ~3x slower for a conv4), so ``"auto"`` times both once per
model signature, episode shape and device, on a few of the tasks, and remembers the choice
for the process: the loop for a meta-gradient (it holds one episode's graph at a time,
below) and vmap for predictions alone, unless the other is clearly (1.5x) faster.

A meta-step calls :func:`meta_backward`: adaptation, query loss and backward in one, so
that the loop strategy can back-propagate each episode as soon as its loss is known and
hold one episode's graph at a time instead of the whole meta-batch's. On a CPU with
several intra-op threads (``torch.get_num_threads()``) that loop gives whole episodes to
that many worker threads instead of splitting each small kernel across them (below).
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from autometa.task import Episodes

log = logging.getLogger(__name__)

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["auto", "vmap", "loop"]
#: A scalar step size, or one tensor per parameter (Meta-SGD's learned rates).
LearningRate = float | Tensor | Mapping[str, Tensor]


def parameters_of(model: nn.Module) -> Params:
    """The model's parameters as a dict of the live tensors (gradients reach the model)."""
    return dict(model.named_parameters())


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    adapt_only: Callable[[str], bool] | None = None,
    autograd: bool = False,
) -> Params:
    """Run ``steps`` of SGD on one support set (x: (n, *input_shape)) and return new params.

    Args:
        adapt_only: if given, only names for which it returns True are updated (ANIL: the
            head); the others are left as they are and still carry their meta-gradient.
        autograd: take the inner gradients with ``torch.autograd.grad`` instead of
            ``torch.func.grad``: the same values and meta-gradients, without func.grad's
            per-call transform set-up, which costs more than a small model's backward
            (benchmarks/README.md, finding 5). Only outside ``vmap``.
    """
    names = [n for n in params if adapt_only is None or adapt_only(n)]
    frozen = {n: p for n, p in params.items() if n not in names}

    def support_loss(fast: Params) -> Tensor:
        return loss_fn(functional_call(model, {**frozen, **fast}, (x,)), y)

    fast = {n: params[n] for n in names}
    if autograd:
        return {**frozen, **_sgd_autograd(support_loss, fast, steps=steps, lr=lr,
                                          first_order=first_order)}
    for _ in range(steps):
        grads = grad(support_loss)(fast)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        fast = {n: p - _lr(lr, n) * grads[n] for n, p in fast.items()}
    return {**frozen, **fast}


def _sgd_autograd(support_loss: Callable[[Params], Tensor], fast: Params, *, steps: int,
                  lr: LearningRate, first_order: bool) -> Params:
    """:func:`adapt`'s SGD steps with ``torch.autograd.grad``, as ``torch.func.grad`` gives.

    Like func.grad, the inner gradients are taken even under ``no_grad`` (evaluation),
    where no graph back to the initial parameters is kept.
    """
    keep = torch.is_grad_enabled()  # a meta-gradient will flow back through the steps

    def leaf(p: Tensor) -> Tensor:
        return p.detach().requires_grad_()

    fast = {n: p if keep and p.requires_grad else leaf(p) for n, p in fast.items()}
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(support_loss(fast), list(fast.values()),
                                        create_graph=keep and not first_order)
            fast = {n: p - _lr(lr, n) * g for (n, p), g in zip(fast.items(), grads,
                                                                strict=True)}
            if not keep:
                fast = {n: leaf(p) for n, p in fast.items()}
    return fast if keep else {n: p.detach() for n, p in fast.items()}


def _lr(lr: LearningRate, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt_and_predict(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    adapt_only: Callable[[str], bool] | None = None,
    strategy: Strategy = "vmap",
) -> Tensor:
    """Adapt to each episode's support set and predict its query set.

    Shapes: support_x (tasks, n_s, *in), support_y (tasks, n_s[, out]), query_x (tasks,
    n_q, *in) -> (tasks, n_q, out). Differentiable w.r.t. ``params`` (and ``lr``).
    """

    def one(sx: Tensor, sy: Tensor, qx: Tensor, autograd: bool) -> Tensor:
        fast = adapt(model, params, sx, sy, loss_fn, steps=steps, lr=lr,
                     first_order=first_order, adapt_only=adapt_only, autograd=autograd)
        return functional_call(model, fast, (qx,))

    def run(chosen: Strategy, tasks: int | None = None) -> Tensor:
        # The loop takes inner gradients with autograd.grad (cheaper outside vmap).
        return each_task(functools.partial(one, autograd=chosen == "loop"),
                         support_x[:tasks], support_y[:tasks], query_x[:tasks],
                         strategy=chosen)

    if strategy == "vmap":
        _refuse_vmap_through_batch_norm(model, first_order)
    elif strategy == "auto":
        shapes = (tuple(support_x.shape), tuple(query_x.shape), steps, adapt_only is None)
        strategy = _choose(model, params, shapes, first_order, run)
    return run(strategy)


def each_task(fn: Callable[..., Any], *tensors: Tensor, strategy: Strategy) -> Any:
    """``fn`` on each task's slice of ``tensors`` (tasks along dim 0), results stacked.

    ``fn`` returns a tensor or a ``{name: tensor}`` dict; ``strategy`` is ``"vmap"`` (one
    batched call) or ``"loop"`` (one call per task); both give the same values.
    """
    if strategy == "vmap":
        return vmap(fn)(*tensors)
    if strategy != "loop":
        raise ValueError(f"unknown inner-loop strategy {strategy!r}; "
                         "expected 'auto', 'vmap' or 'loop'")
    outs = [fn(*t) for t in zip(*tensors, strict=True)]
    if isinstance(outs[0], Mapping):
        return {name: torch.stack([o[name] for o in outs]) for name in outs[0]}
    return torch.stack(outs)


def meta_backward(
    model: nn.Module, episodes: Episodes, loss_fn: LossFn, **options: Any
) -> float:
    """Back-propagate the mean query loss after adaptation; returns that loss.

    The gradient is that of ``loss_fn(adapt_episodes(model, episodes, ...), query_y)``,
    accumulated into ``.grad`` of the model's parameters (and of learned step sizes in
    ``lr``). With the loop strategy each episode is back-propagated as soon as its loss is
    known, so only one episode's graph is alive at a time: a second-order conv4 meta-step
    over 32 episodes peaks at ~65 MB of tensors per worker thread (below) instead of ~1.9 GB
    (benchmarks/memory.py).
    The vmap strategy computes all episodes at once and back-propagates once.

    On a CPU with several intra-op threads, the loop runs episodes on that many worker
    threads, one graph alive per worker, and adds their gradients in a fixed order; there
    the meta-gradient reaches the model's parameters and learned step sizes in ``lr``
    (tensors that need a gradient), which is what the meta-algorithms train. Set
    ``torch.set_num_threads(1)`` for the plain one-thread loop.

    ``options`` are :func:`adapt_and_predict`'s keywords (``steps``, ``lr``, ...);
    every episode must have the same number of query examples (an :class:`Episodes`
    batch does), so the mean over episodes equals the mean over all query examples.
    """
    strategy = options.pop("strategy", "vmap")
    first_order = options.get("first_order", False)
    if strategy == "vmap":
        _refuse_vmap_through_batch_norm(model, first_order)
    elif strategy == "auto":
        # Decided on the whole batch, as adapt_and_predict would (same probe, same cache).
        def run(chosen: Strategy, tasks: int | None = None) -> Tensor:
            return adapt_episodes(model, episodes[:tasks], loss_fn, strategy=chosen,
                                  **options)

        shapes = (tuple(episodes.support_x.shape), tuple(episodes.query_x.shape),
                  options.get("steps"), options.get("adapt_only") is None)
        strategy = _choose(model, parameters_of(model), shapes, first_order, run)
    if strategy == "vmap":
        loss = loss_fn(adapt_episodes(model, episodes, loss_fn, strategy="vmap", **options),
                       episodes.query_y)
        loss.backward()
        return loss.item()
    if strategy != "loop":
        raise ValueError(f"unknown inner-loop strategy {strategy!r}; "
                         "expected 'auto', 'vmap' or 'loop'")
    workers = _episode_workers(model, episodes)
    if workers > 1:
        return _parallel_loop_backward(model, episodes, loss_fn, workers, options)
    total: Tensor | float = 0.0
    for loss in _episode_losses(model, episodes, loss_fn, options, range(len(episodes))):
        loss.backward()  # frees this episode's graph before the next one builds its own
        total = total + loss.detach()  # a tensor: no device sync per episode
    return float(total)


def _episode_losses(model: nn.Module, episodes: Episodes, loss_fn: LossFn,
                    options: Mapping[str, Any], indices: range) -> Iterator[Tensor]:
    """Each indexed episode's query loss after adaptation, over the batch's size (so that
    the losses of all episodes add up to the batch's mean), one episode at a time."""
    for i in indices:
        episode = episodes[i : i + 1]
        pred = adapt_episodes(model, episode, loss_fn, strategy="loop", **options)
        yield loss_fn(pred, episode.query_y) / len(episodes)


# --------------------------------------------------------------------------- parallel loop
# On a CPU, torch splits each kernel over its intra-op threads; an episode's kernels are
# small (a 1-shot support set is 5 images), so much of that is synchronisation. The loop
# instead gives whole episodes to worker threads, one intra-op thread each (autograd's
# kernels release the GIL). Second-order conv4 MAML on 2 cores: ~1.2x the tasks/s of the
# loop that splits kernels over both threads (benchmarks/README.md, finding 7). Episode i
# goes to worker i % workers and the workers' gradients are summed in a fixed order, so a
# result is reproducible.


def _episode_workers(model: nn.Module, episodes: Episodes) -> int:
    """How many threads the loop spreads episodes over: one per intra-op CPU thread.

    1 (the plain loop) off the CPU, with a single thread, under autocast (thread-local,
    not inherited by workers), or where a forward pass writes buffers (BatchNorm's running
    statistics in training), which concurrent episodes would race on.
    """
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return 1
    if _batch_norm_in_training(model, running_stats=True):
        return 1
    return max(1, min(torch.get_num_threads(), len(episodes)))


def _parallel_loop_backward(model: nn.Module, episodes: Episodes, loss_fn: LossFn,
                            workers: int, options: Mapping[str, Any]) -> float:
    """The loop on ``workers`` threads; gradients land in ``.grad`` as backward's would."""
    lr = options.get("lr")
    rates = (list(lr.values()) if isinstance(lr, Mapping) else
             [lr] if isinstance(lr, Tensor) else [])
    leaves = [t for t in [*model.parameters(), *rates] if t.requires_grad]
    threads = torch.get_num_threads()

    def work(replica: nn.Module, first: int) -> tuple[list[Tensor | None], Tensor | float]:
        torch.set_num_threads(max(1, threads // workers))  # this thread's own setting
        grads: list[Tensor | None] = [None] * len(leaves)
        total: Tensor | float = 0.0
        mine = range(first, len(episodes), workers)
        for loss in _episode_losses(replica, episodes, loss_fn, options, mine):
            for k, g in enumerate(torch.autograd.grad(loss, leaves, allow_unused=True)):
                grads[k] = _add(grads[k], g)
            total = total + loss.detach()
        return grads, total

    pool = _pool(workers)
    futures = [pool.submit(work, replica, k)
               for k, replica in enumerate(_replicas(model, workers))]
    concurrent.futures.wait(futures)
    torch.set_num_threads(threads)  # the workers' setting also reached torch's global one
    results = [f.result() for f in futures]  # re-raises a worker's error
    for k, leaf in enumerate(leaves):  # in worker order: the same sum every time
        leaf.grad = functools.reduce(_add, [grads[k] for grads, _ in results], leaf.grad)
    return float(sum(total for _, total in results))


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None (no gradient) is zero."""
    return b if a is None else a if b is None else a + b


#: The worker threads, made on first use and kept: (threads, pool).
_POOL: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
#: Per model: (identity of its tensors and modes, replicas that share those tensors).
_REPLICAS: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, list[nn.Module]]] = (
    weakref.WeakKeyDictionary())


def _forget_pool() -> None:
    global _POOL
    _POOL = None


# A forked child has none of the parent's threads: it makes its own pool.
os.register_at_fork(after_in_child=_forget_pool)


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] < workers:
        if _POOL is not None:
            _POOL[1].shutdown(wait=True)
        _POOL = workers, concurrent.futures.ThreadPoolExecutor(workers, "autometa-episodes")
    return _POOL[1]


def _replicas(model: nn.Module, count: int) -> list[nn.Module]:
    """``count`` copies of ``model`` that share its parameter and buffer tensors.

    ``functional_call`` swaps tensors into a module's attributes for the length of a call,
    so two threads cannot evaluate one module at once; each worker gets its own copy. The
    copies share the model's tensors (``load_state_dict`` reaches them) and are made anew
    when a tensor is replaced or a module's training mode changes.
    """
    tensors = [*model.parameters(), *model.buffers()]
    key = (tuple(map(id, tensors)), tuple(m.training for m in model.modules()))
    cached = _REPLICAS.get(model)
    if cached is None or cached[0] != key or len(cached[1]) < count:
        shared = {id(t): t for t in tensors}
        cached = key, [copy.deepcopy(model, dict(shared)) for _ in range(count)]
        _REPLICAS[model] = cached
    return cached[1][:count]


#: How much faster the other strategy must be before "auto" leaves the default one (the
#: loop for a meta-gradient, vmap for predictions alone).
CLEAR_WIN = 1.5
#: Strategy chosen by ``"auto"`` per (model, parameter shapes, device, episode shapes, ...).
_CHOSEN: dict[Hashable, Strategy] = {}


def adapt_episodes(model: nn.Module, episodes: Episodes, loss_fn: LossFn, **options: Any
                   ) -> Tensor:
    """:func:`adapt_and_predict` from the model's own parameters on a batch of episodes.

    ``options`` are :func:`adapt_and_predict`'s keywords (``steps``, ``lr``, ...).
    """
    return adapt_and_predict(model, parameters_of(model), episodes.support_x,
                             episodes.support_y, episodes.query_x, loss_fn, **options)


def _batch_norm_needs_loop(model: nn.Module, first_order: bool) -> bool:
    """True if a second-order meta-gradient would pass a BatchNorm in training mode.

    PyTorch's vmap rule for BatchNorm's double backward is wrong (functorch #534), so
    "auto" takes the loop there and an explicit "vmap" is refused.
    """
    return torch.is_grad_enabled() and not first_order and _batch_norm_in_training(model)


def _refuse_vmap_through_batch_norm(model: nn.Module, first_order: bool) -> None:
    if _batch_norm_needs_loop(model, first_order):
        raise ValueError(
            "strategy 'vmap' gives wrong second-order meta-gradients through BatchNorm "
            "(PyTorch functorch issue #534); use 'loop' or 'auto', or first_order=True"
        )


def _choose(model: nn.Module, params: Params, shapes: tuple[Any, ...], first_order: bool,
            run: Callable[[Strategy, int], Tensor]) -> Strategy:
    """The loop where BatchNorm needs it, else the faster strategy, timed once per key.

    ``shapes``: (support shape, query shape, inner steps, adapts all parameters?).
    """
    if _batch_norm_needs_loop(model, first_order):
        return "loop"
    device = next(iter(params.values())).device.type if params else "cpu"
    key = (type(model).__qualname__,
           tuple((n, tuple(p.shape), p.dtype) for n, p in params.items()),
           device, shapes, first_order, torch.is_grad_enabled())
    if key not in _CHOSEN:
        size = sum(p.numel() for p in params.values())
        what = f"{size:,} parameters, support {list(shapes[0])}, {shapes[2]} steps"
        _CHOSEN[key] = _probe(what, run, params)
    return _CHOSEN[key]


def _batch_norm_in_training(model: nn.Module, *, running_stats: bool = False) -> bool:
    """Whether a BatchNorm layer is in training mode (and, with ``running_stats``, updates
    its running statistics there, i.e. a forward pass writes buffers)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and (m.track_running_stats or not running_stats) for m in model.modules())


#: Tasks of the batch that the "auto" probe times (the whole batch would cost seconds).
PROBE_TASKS = 8


def _probe(what: str, run: Callable[[Strategy, int], Tensor], params: Params) -> Strategy:
    """Time both strategies (forward and, in training, backward) and remember the faster.

    Each runs once to warm up (allocations, dispatch caches), then twice more, alternating
    with the other so that a change in the machine's load hits both; the faster of each
    one's two timings counts (a busy 2-core machine once made the loop look slower).
    """
    wrt = [p for p in params.values() if p.requires_grad] if torch.is_grad_enabled() else []
    seconds: dict[Strategy, float] = {"vmap": math.inf, "loop": math.inf}
    for round_ in range(3):
        for candidate in ("vmap", "loop"):
            start = time.perf_counter()
            out = run(candidate, PROBE_TASKS)
            if wrt:  # autograd.grad, not backward(): leaves no .grad behind
                torch.autograd.grad(out.sum(), wrt, allow_unused=True)
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            if round_:
                seconds[candidate] = min(seconds[candidate], time.perf_counter() - start)
    # Only a clear win switches away from the default: the two strategies agree only up to
    # float rounding, so a coin-flip choice on a noisy machine would make runs
    # irreproducible. The default is the loop where a meta-gradient is taken: meta_backward
    # then holds one episode's graph per worker thread, vmap the whole batch's (first-order
    # conv4, 32 episodes: 58 MB a thread against 2.9 GB, benchmarks/memory.py). The probe
    # times the loop on the calling thread; meta_backward's threaded loop is faster still.
    chosen: Strategy
    if wrt:
        chosen = "vmap" if CLEAR_WIN * seconds["vmap"] < seconds["loop"] else "loop"
    else:
        chosen = "loop" if seconds["vmap"] > CLEAR_WIN * seconds["loop"] else "vmap"
    log.info("inner loop: %s for %s (vmap %.1f ms, loop %.1f ms)", chosen, what,
             1e3 * seconds["vmap"], 1e3 * seconds["loop"])
    return chosen
