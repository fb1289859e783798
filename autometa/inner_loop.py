"""The inner-loop toolkit shared by gradient-based meta-algorithms, on torch.func.

Parameters are handled functionally, as a ``{name: tensor}`` dict evaluated through
``torch.func.functional_call``. Adaptation is differentiable end to end: the meta-gradient
flows through the inner SGD steps (second order) unless ``first_order`` treats the inner
gradients as constants. Episodes are processed either all at once with ``torch.func.vmap``
(``"vmap"``) or one at a time (``"loop"``); both give the same values and gradients where
both are allowed. vmap is refused in two cases:

* a second-order meta-gradient through a BatchNorm layer in training mode: PyTorch's vmap
  batching rule for BatchNorm's double backward is wrong (functorch issue #534);
* a forward pass that writes buffers (BatchNorm with running statistics in training
  mode): under vmap the episodes would have to write one buffer at once.

``"auto"`` is :func:`choose_strategy`: a fixed rule on the model's layers and modes and on
whether a meta-gradient is taken, never a timing, so that two runs of a search on one
machine take the same path and give the same bits (the two strategies agree only up to
float rounding). The rule is measured by ``benchmarks/inner_loop_strategies.py``
(``benchmarks/README.md``): the loop for convolutional models, vmap for the others.

**BatchNorm with running statistics** (``track_running_stats=True``), the rule for every
algorithm built on this toolkit, whatever the strategy and the order of the meta-gradient:

* In training mode (meta-training) each forward pass normalises with the statistics of the
  batch it sees and updates the running statistics in place (PyTorch's momentum average,
  ``num_batches_tracked`` + 1), once per pass, in the order the passes run: episode after
  episode, and within an episode each inner step's support pass, then the query pass. Such
  models always run the loop (one episode at a time, on one thread). The running
  statistics are buffers: the inner loop never adapts them, no meta-gradient reaches them.
* In eval mode (``trial.evaluate``: meta-val and meta-test) every pass, the adaptation's
  support passes included, normalises with the running statistics and leaves them
  untouched.

A meta-step calls :func:`meta_backward`: adaptation, query loss and backward in one, so
that the loop strategy can back-propagate each episode as soon as its loss is known and
hold one episode's graph at a time instead of the whole meta-batch's, and can run its
passes through :mod:`autometa.fused_blocks` (``fused``). On a CPU with several intra-op
threads that loop gives whole episodes to worker threads instead of splitting each kernel.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import os
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from autometa import fused_blocks, stacked
from autometa.errors import ConfigError
from autometa.task import Episodes

__all__ = ["LearningRate", "LossFn", "Params", "Strategy", "adapt", "adapt_and_predict",
           "adapt_episodes", "choose_strategy", "each_task", "meta_backward", "parameters_of",
           "resolve_strategy", "with_parameters"]

log = logging.getLogger(__name__)

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Strategy = Literal["auto", "vmap", "loop"]
#: A scalar step size, or one tensor per parameter (Meta-SGD's learned rates).
LearningRate = float | Tensor | Mapping[str, Tensor]


def parameters_of(model: nn.Module) -> Params:
    """The model's parameters as a dict of the live tensors (gradients reach the model)."""
    return dict(model.named_parameters())


def with_parameters(model: nn.Module, fast: Params) -> nn.Module:
    """A frozen eval-mode copy of ``model`` holding the adapted parameters ``fast`` of one
    task, each with a leading task dimension of 1 (as :func:`each_task` gives them for a
    single support set): what an algorithm's ``adapted_module`` returns."""
    adapted = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, value in fast.items():
            adapted.get_parameter(name).copy_(value[0])
    return adapted.requires_grad_(False)


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
    fused: bool = False,
) -> Params:
    """Run ``steps`` of SGD on one support set (x: (n, *input_shape)) and return new params.

    Args:
        adapt_only: if given, only names for which it returns True are updated (ANIL: the
            head); the others are left as they are and still carry their meta-gradient.
        autograd: take the inner gradients with ``torch.autograd.grad`` instead of
            ``torch.func.grad``: the same values and meta-gradients, without func.grad's
            per-call transform set-up, which costs more than a small model's backward
            (benchmarks/README.md, finding 5). Only outside ``vmap``.
        fused: with ``autograd``, the support passes run :mod:`autometa.fused_blocks`.
    """
    names = [n for n in params if adapt_only is None or adapt_only(n)]
    frozen = {n: p for n, p in params.items() if n not in names}

    def support_loss(fast: Params) -> Tensor:
        every = {**frozen, **fast}
        out = fused and autograd and fused_blocks.try_forward(model, every, x, higher_order=True)
        return loss_fn(out if isinstance(out, Tensor) else functional_call(model, every, (x,)), y)

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
    fused: bool = False,
) -> Tensor:
    """Adapt to each episode's support set and predict its query set.

    Shapes: support_x (tasks, n_s, *in), support_y (tasks, n_s[, out]), query_x (tasks,
    n_q, *in) -> (tasks, n_q, out). Differentiable w.r.t. ``params`` (and ``lr``).

    Args:
        strategy: ``"vmap"``, ``"loop"`` or ``"auto"`` (:func:`choose_strategy`); a
            meta-gradient is taken where gradients are enabled.
        fused: the loop runs each support and query pass through
            :mod:`autometa.fused_blocks` where it recognises the model (faster on a CPU);
            the result may then be differentiated once only, as :func:`meta_backward` does.

    Raises:
        ConfigError: an unknown strategy, or ``"vmap"`` where it is refused (module
            docstring).
    """

    def one(sx: Tensor, sy: Tensor, qx: Tensor, autograd: bool) -> Tensor:
        fast = adapt(model, params, sx, sy, loss_fn, steps=steps, lr=lr, first_order=first_order,
                     adapt_only=adapt_only, autograd=autograd, fused=fused)
        out = fused and autograd and fused_blocks.try_forward(model, fast, qx)
        return out if isinstance(out, Tensor) else functional_call(model, fast, (qx,))

    chosen = resolve_strategy(model, strategy, first_order=first_order)
    layers = stacked.layers_of(model) if chosen == "vmap" else None
    if layers is not None:  # a perceptron: vmap's computation, without its transforms
        names = [n for n in params if adapt_only is None or adapt_only(n)]
        frozen = {n: p for n, p in params.items() if n not in names}
        episode_loss = vmap(loss_fn)  # (tasks,): each episode's own mean loss

        def support_loss(fast: Params) -> Tensor:  # their sum: each slice's grad its own
            pred = stacked.forward(layers, {**frozen, **fast}, support_x)
            return episode_loss(pred, support_y).sum()

        fast = {n: params[n].expand(len(support_x), *params[n].shape) for n in names}
        with stacked.threads_for(model, support_x, query_x):  # a small perceptron: 1
            fast = _sgd_autograd(support_loss, fast, steps=steps, lr=lr, first_order=first_order)
            return stacked.forward(layers, {**frozen, **fast}, query_x)
    # The loop: inner gradients by autograd.grad (cheaper outside vmap; can write BN stats).
    return each_task(functools.partial(one, autograd=chosen == "loop"), support_x, support_y,
                     query_x, strategy=chosen)


def each_task(fn: Callable[..., Any], *tensors: Tensor, strategy: Strategy) -> Any:
    """``fn`` on each task's slice of ``tensors`` (tasks along dim 0), results stacked.

    ``fn`` returns a tensor or a ``{name: tensor}`` dict; ``strategy`` is ``"vmap"`` (one
    batched call) or ``"loop"`` (one call per task); both give the same values.
    """
    if strategy == "vmap":
        return vmap(fn)(*tensors)
    if strategy != "loop":
        raise ConfigError(_unknown(strategy))
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
    The vmap strategy computes all episodes at once and back-propagates once. The loop
    runs with ``fused=True`` unless ``options`` say otherwise (:func:`adapt_and_predict`).

    On a CPU with several intra-op threads, the loop runs episodes on that many worker
    threads, one graph alive per worker, and adds their gradients in a fixed order; there
    the meta-gradient reaches the model's parameters and learned step sizes in ``lr``
    (tensors that need a gradient), which is what the meta-algorithms train. Set
    ``torch.set_num_threads(1)`` for the plain one-thread loop.

    ``options`` are :func:`adapt_and_predict`'s keywords (``steps``, ``lr``, ...);
    every episode must have the same number of query examples (an :class:`Episodes`
    batch does), so the mean over episodes equals the mean over all query examples.
    """
    strategy = resolve_strategy(model, options.pop("strategy", "vmap"),
                                first_order=options.get("first_order", False),
                                meta_gradient=True)
    if strategy == "vmap":
        with stacked.threads_for(model, episodes.support_x, episodes.query_x):  # small: 1
            loss = loss_fn(adapt_episodes(model, episodes, loss_fn, strategy="vmap",
                                          **options), episodes.query_y)
            loss.backward()
        return loss.item()
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
        pred = adapt_episodes(model, episode, loss_fn, strategy="loop",
                              **{"fused": True, **options})
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


def adapt_episodes(model: nn.Module, episodes: Episodes, loss_fn: LossFn, **options: Any
                   ) -> Tensor:
    """:func:`adapt_and_predict` from the model's own parameters on a batch of episodes.

    ``options`` are :func:`adapt_and_predict`'s keywords (``steps``, ``lr``, ...).
    """
    return adapt_and_predict(model, parameters_of(model), episodes.support_x,
                             episodes.support_y, episodes.query_x, loss_fn, **options)


# --------------------------------------------------------------------------- strategy
# "auto" was once a timing of both strategies on the first batch of each shape: on a busy
# machine the choice flipped from run to run, and since the two round differently, so did
# a search's leaderboard. It is now a rule, measured by benchmarks/inner_loop_strategies.py.

#: Layers that "auto" loops over episodes. Measured on a 2-core CPU (benchmarks/README.md,
#: "Inner-loop strategies"): a conv4's meta-gradients and predictions ran 1.6-2.9x faster
#: looped (a vmapped convolution is a grouped one over the episodes, and BatchNorm after it
#: moves them into its channels, leaving strided copies), the sinusoid MLP's 6-9x faster
#: vmapped, with or without BatchNorm1d layers.
LOOP_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)


def choose_strategy(model: nn.Module, *, meta_gradient: bool, first_order: bool = False
                    ) -> Literal["vmap", "loop"]:
    """What ``"auto"`` runs: a pure function of the model's layers and training modes.

    In order:

    1. the loop where a forward pass writes BatchNorm's running statistics (training mode,
       ``track_running_stats``) or a second-order meta-gradient passes a BatchNorm in
       training mode: vmap is refused there (module docstring);
    2. the loop for a model with a layer of :data:`LOOP_LAYERS` (a convolution);
    3. vmap otherwise.

    Episode shapes, parameter count and device do not enter: on the measured workloads
    (benchmarks/README.md) 2 and 3 picked the faster strategy for 1 and 5 inner steps,
    meta-gradients and predictions, 1 and 2 threads. It was measured on a CPU only; on a
    GPU measure with ``benchmarks/inner_loop_strategies.py --device cuda`` and pass
    ``strategy`` where the other is faster.

    Args:
        meta_gradient: whether a gradient is taken through the adaptation (grad enabled).
        first_order: whether that meta-gradient ignores second-order terms.
    """
    if _vmap_refusal(model, meta_gradient=meta_gradient, first_order=first_order):
        return "loop"
    if any(isinstance(m, LOOP_LAYERS) for m in model.modules()):
        return "loop"
    return "vmap"


def resolve_strategy(model: nn.Module, strategy: str, *, first_order: bool,
                     meta_gradient: bool | None = None) -> Literal["vmap", "loop"]:
    """The strategy that runs: ``"auto"`` by :func:`choose_strategy`; ``"vmap"`` checked.

    Args:
        meta_gradient: whether a gradient is taken through the adaptation; default: whether
            gradients are enabled (``torch.is_grad_enabled()``).

    Raises:
        ConfigError: an unknown strategy, or ``"vmap"`` where it is refused (module
            docstring), naming the reason and what to use instead.
    """
    if meta_gradient is None:
        meta_gradient = torch.is_grad_enabled()
    if strategy == "auto":
        return choose_strategy(model, meta_gradient=meta_gradient, first_order=first_order)
    if strategy == "vmap":
        reason = _vmap_refusal(model, meta_gradient=meta_gradient, first_order=first_order)
        if reason:
            raise ConfigError(f"strategy 'vmap' {reason}")
        return "vmap"
    if strategy == "loop":
        return "loop"
    raise ConfigError(_unknown(strategy))


def _unknown(strategy: object) -> str:
    return f"unknown inner-loop strategy {strategy!r}; expected 'auto', 'vmap' or 'loop'"


def _vmap_refusal(model: nn.Module, *, meta_gradient: bool, first_order: bool) -> str | None:
    """Why vmap cannot serve this model and mode (the rest of a message), or None."""
    if _batch_norm_in_training(model, running_stats=True):
        return ("cannot update BatchNorm running statistics (track_running_stats=True) in "
                "training mode one episode at a time; use 'loop' or 'auto'")
    if meta_gradient and not first_order and _batch_norm_in_training(model):
        return ("gives wrong second-order meta-gradients through BatchNorm (PyTorch "
                "functorch issue #534); use 'loop' or 'auto', or first_order=True")
    return None


def _batch_norm_in_training(model: nn.Module, *, running_stats: bool = False) -> bool:
    """Whether a BatchNorm layer is in training mode (and, with ``running_stats``, updates
    its running statistics there, i.e. a forward pass writes buffers)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               and (m.track_running_stats or not running_stats) for m in model.modules())
