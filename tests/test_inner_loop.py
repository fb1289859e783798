"""The inner-loop toolkit: meta_backward against a float64 reference, strategies, each_task."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from limits import FORKED_CALL
from torch import Tensor, nn

from autometa import Backbone, Episodes
from autometa.inner_loop import adapt_episodes, each_task, meta_backward, parameters_of
from autometa.metrics import loss_for

IN, HIDDEN, OUT = 3, 6, 2


def _mlp() -> Backbone:
    torch.manual_seed(0)
    # tanh: a non-zero second derivative exercises every second-order term.
    return Backbone(nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh()),
                    nn.Linear(HIDDEN, OUT)).double()


def _episodes(tasks: int = 4, kind: str = "regression") -> Episodes:
    g = torch.Generator().manual_seed(3)

    def y(n: int) -> Tensor:
        if kind == "classification":
            return torch.randint(0, OUT, (tasks, n), generator=g)
        return torch.randn(tasks, n, OUT, generator=g, dtype=torch.float64)

    return Episodes(torch.randn(tasks, 5, IN, generator=g, dtype=torch.float64), y(5),
                    torch.randn(tasks, 7, IN, generator=g, dtype=torch.float64), y(7))


def _reference(model: nn.Module, episodes: Episodes, kind: str, lr: float | dict, steps: int,
               first_order: bool) -> list[Tensor]:
    """Naive MAML meta-gradient: one task at a time, autograd.grad(create_graph)."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    losses = []
    for i in range(len(episodes)):
        fast = params
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, fast, strict=True)),
                                             (episodes.support_x[i],))
            grads = torch.autograd.grad(loss_for(kind, out, episodes.support_y[i]), fast,
                                        create_graph=not first_order)
            step = [lr[n] if isinstance(lr, dict) else lr for n in names]
            fast = [w - a * g for w, a, g in zip(fast, step, grads, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, fast, strict=True)),
                                         (episodes.query_x[i],))
        losses.append(loss_for(kind, out, episodes.query_y[i]))
    wrt = params + (list(lr.values()) if isinstance(lr, dict) else [])
    return list(torch.autograd.grad(torch.stack(losses).mean(), wrt))


def _grads(model: nn.Module, lr: float | dict) -> list[Tensor]:
    extra = list(lr.values()) if isinstance(lr, dict) else []
    return [p.grad for p in [*model.parameters(), *extra]]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """torch's intra-op threads for the test: the loop spreads episodes over 2 of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_meta_backward_matches_the_reference(strategy, first_order, kind, threads):
    model, episodes = _mlp(), _episodes(kind=kind)
    expected = _reference(model, episodes, kind, 0.3, 2, first_order)
    loss = meta_backward(model, episodes, lambda p, t: loss_for(kind, p, t), steps=2, lr=0.3,
                         first_order=first_order, strategy=strategy)
    for got, want in zip(_grads(model, 0.3), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    with torch.no_grad():
        pred = adapt_episodes(model, episodes, lambda p, t: loss_for(kind, p, t), steps=2,
                              lr=0.3, first_order=True, strategy="loop")
    assert loss == pytest.approx(float(loss_for(kind, pred, episodes.query_y)), rel=1e-10)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_meta_backward_reaches_learned_step_sizes(strategy, threads):
    """Meta-SGD's per-entry rates get their meta-gradient too."""
    model, episodes = _mlp(), _episodes()
    lr = {n: torch.full_like(p, 0.2).requires_grad_() for n, p in model.named_parameters()}
    expected = _reference(model, episodes, "regression", lr, 1, False)
    meta_backward(model, episodes, lambda p, t: loss_for("regression", p, t), steps=1, lr=lr,
                  strategy=strategy)
    for got, want in zip(_grads(model, lr), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_meta_backward_through_batch_norm_uses_the_loop_and_is_right():
    """Second order through BatchNorm: "auto" takes the loop, one backward per episode."""
    torch.manual_seed(0)
    net = Backbone(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                                 nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                                 nn.Flatten()), nn.Linear(3 * 6 * 6, OUT)).double()
    g = torch.Generator().manual_seed(0)
    episodes = Episodes(torch.randn(3, 4, 1, 6, 6, generator=g, dtype=torch.float64),
                        torch.randint(0, OUT, (3, 4), generator=g),
                        torch.randn(3, 5, 1, 6, 6, generator=g, dtype=torch.float64),
                        torch.randint(0, OUT, (3, 5), generator=g))
    twin = copy.deepcopy(net)

    def loss(p: Tensor, t: Tensor) -> Tensor:
        return loss_for("classification", p, t)

    meta_backward(net, episodes, loss, steps=2, lr=0.1, strategy="auto")
    # The stacked loop: every episode's graph alive, one backward (the old meta-step).
    loss(adapt_episodes(twin, episodes, loss, steps=2, lr=0.1, strategy="loop"),
         episodes.query_y).backward()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="functorch issue #534"):
        meta_backward(net, episodes, loss, steps=1, lr=0.1, strategy="vmap")


def _conv(running_stats: bool = False) -> Backbone:
    torch.manual_seed(0)
    return Backbone(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                                  nn.BatchNorm2d(3, track_running_stats=running_stats),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()),
                    nn.Linear(3 * 3 * 3, OUT)).double()


def _images(tasks: int = 5) -> Episodes:
    g = torch.Generator().manual_seed(1)
    return Episodes(torch.randn(tasks, 4, 1, 6, 6, generator=g, dtype=torch.float64),
                    torch.randint(0, OUT, (tasks, 4), generator=g),
                    torch.randn(tasks, 5, 1, 6, 6, generator=g, dtype=torch.float64),
                    torch.randint(0, OUT, (tasks, 5), generator=g))


class _Recording:
    """A classification loss that notes which threads evaluated it."""

    def __init__(self):
        self.threads: set[str] = set()

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        self.threads.add(threading.current_thread().name)
        return loss_for("classification", pred, target)


def _meta_gradient(model: nn.Module, episodes: Episodes, threads: int, **options
                   ) -> tuple[float, list[Tensor], set[str]]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss_fn = _Recording()
        model.zero_grad(set_to_none=True)
        loss = meta_backward(model, episodes, loss_fn, strategy="loop", **options)
        assert torch.get_num_threads() == threads  # restored after the workers ran
        return loss, [p.grad.clone() for p in model.parameters()], loss_fn.threads
    finally:
        torch.set_num_threads(before)


def test_the_loop_spreads_episodes_over_threads_with_the_same_meta_gradient():
    """2 intra-op threads: episodes on 2 workers, same loss and meta-gradient as 1 thread."""
    model, episodes = _conv(), _images()
    loss1, grads1, names1 = _meta_gradient(model, episodes, 1, steps=2, lr=0.1)
    loss2, grads2, names2 = _meta_gradient(model, episodes, 2, steps=2, lr=0.1)
    assert names1 == {threading.current_thread().name}
    assert len(names2) == 2 and all(n.startswith("autometa-episodes") for n in names2)
    assert loss2 == pytest.approx(loss1, rel=1e-12)
    for a, b in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # Run to run, the same sum in the same order: the same bits.
    _, again, _ = _meta_gradient(model, episodes, 2, steps=2, lr=0.1)
    for a, b in zip(grads2, again, strict=True):
        assert torch.equal(a, b)


def test_the_threaded_loop_sees_weights_loaded_into_the_model():
    model, episodes = _conv(), _images()
    _meta_gradient(model, episodes, 2, steps=1, lr=0.1)  # workers' replicas now exist
    other = _conv()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    _, got, _ = _meta_gradient(model, episodes, 2, steps=1, lr=0.1)
    _, want, _ = _meta_gradient(other, episodes, 1, steps=1, lr=0.1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_the_loop_stays_on_one_thread_where_a_forward_writes_running_statistics():
    model = _conv(running_stats=True)
    _, _, names = _meta_gradient(model, _images(), 2, steps=1, lr=0.1, first_order=True)
    assert names == {threading.current_thread().name}


def test_an_error_in_a_worker_reaches_the_caller_and_threads_are_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def bad(pred: Tensor, target: Tensor) -> Tensor:
            raise RuntimeError("loss exploded")

        with pytest.raises(RuntimeError, match="loss exploded"):
            meta_backward(_conv(), _images(), bad, steps=1, lr=0.1, strategy="loop")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_each_task_stacks_tensors_and_dicts_alike_in_both_strategies():
    x = torch.randn(4, 3, 2)

    def fn(xi: Tensor) -> dict[str, Tensor]:
        return {"sum": xi.sum(0), "max": xi.max()}

    for strategy in ("vmap", "loop"):
        out = each_task(fn, x, strategy=strategy)
        torch.testing.assert_close(out["sum"], x.sum(1))
        torch.testing.assert_close(out["max"], x.amax((1, 2)))
        torch.testing.assert_close(each_task(lambda xi: xi * 2, x, strategy=strategy), 2 * x)
    with pytest.raises(ValueError, match="unknown inner-loop strategy 'fast'"):
        each_task(fn, x, strategy="fast")


def test_meta_backward_leaves_the_parameters_alone():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    meta_backward(model, _episodes(), lambda p, t: loss_for("regression", p, t), steps=1,
                  lr=0.1, strategy="loop")
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert all(p.grad is not None for p in parameters_of(model).values())


def _mlp_with_batch_norm(running_stats: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN),
                         nn.BatchNorm1d(HIDDEN, track_running_stats=running_stats),
                         nn.Linear(HIDDEN, OUT))


@pytest.mark.parametrize(("model", "training", "meta_gradient", "first_order", "chosen"), [
    # Measured (benchmarks/README.md): an MLP runs faster vmapped, a conv4 looped, in both
    # meta-gradients and predictions.
    (_mlp, True, True, False, "vmap"),
    (_mlp, False, False, True, "vmap"),
    (_conv, True, True, True, "loop"),
    (_conv, False, False, True, "loop"),
    # BatchNorm alone does not slow vmap (measured); looped only where vmap is refused.
    (lambda: _mlp_with_batch_norm(False), True, True, True, "vmap"),
    (lambda: _mlp_with_batch_norm(True), False, False, True, "vmap"),
    (lambda: _mlp_with_batch_norm(False), True, True, False, "loop"),  # functorch #534
    (lambda: _mlp_with_batch_norm(True), True, False, True, "loop"),  # writes buffers
])
def test_auto_is_a_rule_on_the_model(model, training, meta_gradient, first_order, chosen):
    """No timing: the same model, mode and meta-gradient give the same strategy, always."""
    from autometa.inner_loop import choose_strategy, resolve_strategy

    net = model().train(training)
    assert choose_strategy(net, meta_gradient=meta_gradient, first_order=first_order) == chosen
    with torch.set_grad_enabled(meta_gradient):
        assert resolve_strategy(net, "auto", first_order=first_order) == chosen
    assert resolve_strategy(net, "loop", first_order=first_order) == "loop"


@pytest.mark.parametrize(("running_stats", "training", "meta_gradient", "first_order",
                          "refused"), [
    (False, True, True, False, "gives wrong second-order meta-gradients through BatchNorm"),
    (False, True, True, True, None),  # first order: vmap's values are right
    (False, True, False, False, None),  # predictions alone
    (True, True, False, True, "cannot update BatchNorm running statistics"),
    (True, True, True, True, "cannot update BatchNorm running statistics"),
    (True, False, True, False, None),  # eval mode: nothing is written, no BatchNorm backward
])
def test_an_explicit_vmap_is_refused_only_where_it_would_be_wrong(
        running_stats, training, meta_gradient, first_order, refused):
    from autometa import ConfigError
    from autometa.inner_loop import resolve_strategy

    net = _mlp_with_batch_norm(running_stats).train(training)
    if refused is None:
        assert resolve_strategy(net, "vmap", first_order=first_order,
                                meta_gradient=meta_gradient) == "vmap"
    else:
        with pytest.raises(ConfigError, match=f"^strategy 'vmap' {refused}"):
            resolve_strategy(net, "vmap", first_order=first_order,
                             meta_gradient=meta_gradient)
    with pytest.raises(ConfigError, match="unknown inner-loop strategy 'fast'; expected"):
        resolve_strategy(net, "fast", first_order=first_order)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_autograd_inner_steps_equal_torch_func_grad(grad_enabled, first_order):
    """The loop's autograd.grad steps give func.grad's values and meta-gradients, also with
    learned per-parameter rates, a head-only inner loop and a frozen parameter."""
    from autometa.inner_loop import adapt

    model = _mlp()
    model.features[0].bias.requires_grad_(False)  # a parameter the user froze
    episodes = _episodes(tasks=1)
    x, y = episodes.support_x[0], episodes.support_y[0]
    for lr, adapt_only in ((0.3, None), ({n: torch.full_like(p, 0.2).requires_grad_()
                                          for n, p in model.named_parameters()}, None),
                           (0.3, lambda n: n.startswith("head."))):
        outs = []
        for autograd in (False, True):
            with torch.set_grad_enabled(grad_enabled):
                fast = adapt(model, parameters_of(model), x, y,
                             lambda p, t: loss_for("regression", p, t), steps=3, lr=lr,
                             first_order=first_order, adapt_only=adapt_only, autograd=autograd)
            outs.append(fast)
            if grad_enabled:
                wrt = [p for p in model.parameters() if p.requires_grad]
                extra = list(lr.values()) if isinstance(lr, dict) else []
                total = sum((v ** 2).sum() for v in fast.values())
                outs.append(torch.autograd.grad(total, wrt + extra, allow_unused=True))
            else:  # no graph kept: only untouched (frozen) parameters still require grad
                outs.append([v.requires_grad for v in fast.values()])
        half = len(outs) // 2
        for a, b in zip(outs[:half], outs[half:], strict=True):
            if isinstance(a, dict):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            elif not grad_enabled:
                assert a == b
            else:
                for ga, gb in zip(a, b, strict=True):
                    assert (ga is None) == (gb is None)
                    if ga is not None:
                        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_the_threaded_loop_works_in_a_forked_child():
    """A child forked after the workers exist has none of their threads; it makes its own."""
    import multiprocessing

    model, episodes = _conv(), _images()
    _, want, _ = _meta_gradient(model, episodes, 2, steps=1, lr=0.1)  # the pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        loss, got, names = pool.apply_async(
            _meta_gradient, (model, episodes, 2), {"steps": 1, "lr": 0.1}).get(timeout=FORKED_CALL)
    assert len(names) == 2
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
