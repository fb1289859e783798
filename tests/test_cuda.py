"""On a CUDA device: meta-gradients against float64 references (in float32, and under bf16
autocast), BatchNorm, and a trial that runs out of device memory.

Every test here is marked ``cuda``: where ``torch.cuda.is_available()`` is False, conftest
skips them with that reason. ``benchmarks/gpu_check.py`` (``make gpu-check``) runs them on
a GPU (``pytest -m cuda``); its CPU dry run (``--device cpu``) sets
``AUTOMETA_CUDA_TESTS_DEVICE=cpu`` so that the same code runs here on the CPU, where the
float32 results are held to the same float64 references.

The references are the ones of tests/test_inner_loop.py and
tests/test_inner_loop_batchnorm.py: plain autograd in float64 on the CPU, one episode at a
time, ``create_graph=True`` for the second-order terms. The device runs float32 with TF32
off (TF32 rounds matmul and convolution inputs to 10 mantissa bits: a different
computation, not rounding noise), so the tolerance is float32's: the second-order
meta-gradient of a 2-step inner loop within 2e-3 of the largest reference entry.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import CUDA_TESTS_DEVICE, SMALL_SINUSOID
from optuna.trial import FrozenTrial
from test_precision import BF16_GRAD_COSINE, BF16_GRAD_RTOL
from torch import Tensor, nn
from torch.func import functional_call

import autometa
from autometa import Backbone, Episodes, SourceModel, TaskSpec
from autometa.inner_loop import meta_backward
from autometa.metrics import loss_for
from autometa.precision import autocast, check_supported
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.mlp.model import MLP

pytestmark = pytest.mark.cuda

#: The device under test: CUDA, or the CPU in gpu_check.py's dry run.
DEVICE = torch.device(os.environ.get(CUDA_TESTS_DEVICE) or "cuda")
#: max |g - g_ref| <= RTOL * max |g_ref|, per parameter tensor (float32 against float64).
RTOL = 2e-3


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _reference(model: nn.Module, ep: Episodes, kind: str, *, lr: float, steps: int
               ) -> tuple[list[Tensor], list[Tensor]]:
    """Second-order MAML meta-gradient (mean query loss), one episode at a time, and the
    BatchNorm buffers after it: plain autograd on ``model`` (float64, CPU)."""
    names, weights = zip(*model.named_parameters(), strict=True)
    losses = []
    for t in range(len(ep)):
        fast = list(weights)
        for _ in range(steps):
            out = functional_call(model, dict(zip(names, fast, strict=True)),
                                  (ep.support_x[t],))
            grads = torch.autograd.grad(loss_for(kind, out, ep.support_y[t]), fast,
                                        create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        out = functional_call(model, dict(zip(names, fast, strict=True)), (ep.query_x[t],))
        losses.append(loss_for(kind, out, ep.query_y[t]))
    grads = list(torch.autograd.grad(torch.stack(losses).mean(), weights))
    return grads, [b.clone() for b in model.buffers() if b.is_floating_point()]


def _on_device(model: nn.Module, ep: Episodes, kind: str, *, lr: float, steps: int,
               strategy: str) -> tuple[list[Tensor], list[Tensor]]:
    """The same through autometa's inner loop (``meta_backward``), float32 on DEVICE."""
    model = model.float().to(DEVICE)
    ep = Episodes(*(t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE)
                    for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    meta_backward(model, ep, lambda p, y: loss_for(kind, p, y), steps=steps, lr=lr,
                  strategy=strategy)
    grads = [p.grad.detach().double().cpu() for p in model.parameters()]
    return grads, [b.double().cpu() for b in model.buffers() if b.is_floating_point()]


def _assert_float32_close(got: list[Tensor], want: list[Tensor]) -> None:
    """Each tensor within RTOL of its largest reference entry; a tensor whose true
    gradient is (near) zero, as a conv bias before BatchNorm, within RTOL of 1% of the
    largest entry of all (float32 leaves rounding noise where float64 has ~1e-16)."""
    floor = 0.01 * max(float(w.abs().max()) for w in want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = max(float(w.abs().max()), floor)
        err = float((g - w).abs().max())
        assert err <= RTOL * scale, f"tensor {i} {tuple(w.shape)}: max error {err:.3g} " \
                                    f"against max |reference| {scale:.3g}"


def _episodes(kind: str, shape: tuple[int, ...], classes: int, tasks: int = 3,
              support: int = 5, query: int = 7) -> Episodes:
    g = torch.Generator().manual_seed(3)

    def y(n: int) -> Tensor:
        if kind == "classification":
            return torch.randint(0, classes, (tasks, n), generator=g)
        return torch.randn(tasks, n, classes, generator=g, dtype=torch.float64)

    def x(n: int) -> Tensor:
        return torch.randn(tasks, n, *shape, generator=g, dtype=torch.float64)

    return Episodes(x(support), y(support), x(query), y(query))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_mlp_meta_gradient_matches_float64(strategy: str) -> None:
    """The sinusoid MLP (the ``mlp`` source, tanh-free ReLU as shipped), 2 inner steps."""
    torch.manual_seed(0)
    model = MLP(hidden=40).build(TaskSpec("regression", (1,), 1)).double()
    ep = _episodes("regression", (1,), 1, tasks=4, support=10, query=10)
    want, _ = _reference(model, ep, "regression", lr=0.01, steps=2)
    got, _ = _on_device(model, ep, "regression", lr=0.01, steps=2, strategy=strategy)
    _assert_float32_close(got, want)


@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_conv4_meta_gradient_through_batchnorm_matches_float64(strategy: str) -> None:
    """The ``conv4`` source (conv, BatchNorm with batch statistics, ReLU, max-pool; cuDNN
    on a GPU), 5-way 1-shot, 2 inner steps; ``auto`` must take the loop (BatchNorm)."""
    torch.manual_seed(0)
    model = Conv4(channels=8).build(TaskSpec("classification", (1, 28, 28), 5)).double()
    ep = _episodes("classification", (1, 28, 28), 5, tasks=3, support=5, query=10)
    want, _ = _reference(model, ep, "classification", lr=0.1, steps=2)
    got, _ = _on_device(model, ep, "classification", lr=0.1, steps=2, strategy=strategy)
    _assert_float32_close(got, want)


def test_conv4_meta_gradient_under_bf16_autocast_stays_close() -> None:
    """``precision = "bf16"`` on the device: the device accepts it (a GPU of compute
    capability 8.0 or later), and the second-order conv4 meta-gradient under bf16
    autocast (MAML's default inner loop: 1 step of 0.01) is within tests/test_precision.py's
    tolerances (relative L2 and cosine) of the float64 reference. Measured on the CPU:
    0.21-0.24 (cosine 0.97-0.98); the error grows with the inner loop (2 steps of 0.01:
    0.31-0.34; 2 steps of 0.1: 0.6-0.72, cosine 0.75-0.83)."""
    check_supported(["bf16"], DEVICE)
    torch.manual_seed(0)
    model = Conv4(channels=8).build(TaskSpec("classification", (1, 28, 28), 5)).double()
    ep = _episodes("classification", (1, 28, 28), 5, tasks=3, support=5, query=10)
    want, _ = _reference(model, ep, "classification", lr=0.01, steps=1)
    with autocast("bf16", DEVICE):
        got, _ = _on_device(model, ep, "classification", lr=0.01, steps=1, strategy="loop")
    flat_got, flat_want = (torch.cat([g.flatten() for g in got]),
                           torch.cat([w.flatten() for w in want]))
    error = float((flat_got - flat_want).norm() / flat_want.norm())
    cosine = float(torch.nn.functional.cosine_similarity(flat_got, flat_want, dim=0))
    assert 0 < error < BF16_GRAD_RTOL and cosine > BF16_GRAD_COSINE, (error, cosine)


def test_vmap_through_batchnorm_is_refused_on_the_device() -> None:
    """The vmap batching rule of BatchNorm's double backward is wrong (functorch #534) on
    every device: an explicit vmap request is refused there too, never run silently."""
    model = Conv4(channels=4).build(TaskSpec("classification", (1, 8, 8), 3))
    ep = _episodes("classification", (1, 8, 8), 3, tasks=2, support=3, query=3)
    with pytest.raises(ValueError, match="BatchNorm"):
        _on_device(model, ep, "classification", lr=0.1, steps=1, strategy="vmap")


def test_batchnorm_running_statistics_match_float64() -> None:
    """BatchNorm that keeps running statistics: the meta-gradient and the statistics every
    training-mode pass updated (in the reference's order) match float64 on the CPU."""
    torch.manual_seed(0)
    net = Backbone(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3),
                                 nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()),
                   nn.Linear(4 * 4 * 4, 3)).double()
    ep = _episodes("classification", (1, 8, 8), 3, tasks=3, support=6, query=6)
    twin = copy.deepcopy(net)  # the reference's passes update net's own statistics
    want, want_stats = _reference(net, ep, "classification", lr=0.1, steps=2)
    got, got_stats = _on_device(twin, ep, "classification", lr=0.1, steps=2, strategy="loop")
    _assert_float32_close(got, want)
    _assert_float32_close(got_stats, want_stats)


# --------------------------------------------------------------------------------------
# A trial that runs out of device memory: failed with the reason, the memory back to its
# level before the trial, and the next trial runs. The source's activations, not its
# weights, are too large: its features widen each example to WIDTH copies (no parameters),
# so building it costs nothing and its first forward pass allocates 0.6 of the memory
# budget: the first allocation succeeds, the next fails, as in a real model too wide
# for the card.


class _Widen(nn.Module):
    """(n, f) -> (n, f): ReLU over ``width`` shifted copies of each feature, averaged."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        shift = torch.linspace(-1, 1, self.width, device=x.device, dtype=x.dtype)
        return torch.relu(x.unsqueeze(-1) + shift).mean(-1)  # (n, f, width) in between


def _huge_source(budget_bytes: int, per_pass: int) -> type[SourceModel]:
    """A source whose forward pass over ``per_pass`` examples (or more) allocates 0.6 of
    ``budget_bytes`` at once, twice per training step."""
    features = 8
    width = int(0.6 * budget_bytes / (per_pass * features * 4)) + 1

    class Huge(SourceModel):
        @classmethod
        def search_space(cls):
            return {}

        def build(self, spec: TaskSpec) -> Backbone:
            return Backbone(nn.Sequential(nn.Linear(spec.input_shape[0], features),
                                          _Widen(width)), nn.Linear(features, spec.output_size))

    return Huge


@contextlib.contextmanager
def _cpu_address_space_limit(headroom: int) -> Iterator[None]:
    """The CPU dry run: cap this process's address space ``headroom`` bytes above its size
    now, so that an allocation beyond it fails as a card's would (nothing is touched)."""
    vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text()
              .splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom if hard == resource.RLIM_INFINITY else min(vm + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_out_of_memory_trial_fails_frees_the_device_and_the_next_trial_runs(
        tmp_path: Path) -> None:
    """A real search (one worker, in this process): the source that does not fit fails
    with "OutOfMemoryError: CUDA out of memory ...", the memory allocated on the device
    is back to its level when that trial started, and the next trial completes."""
    cuda = DEVICE.type == "cuda"
    if cuda:
        budget = torch.cuda.get_device_properties(DEVICE).total_memory
        limit: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    elif sys.platform.startswith("linux"):
        # The CPU dry run: a forward pass asks for 16 GiB against 4 GiB of headroom.
        budget, limit = 2 ** 34 // 6 * 10, _cpu_address_space_limit(2 ** 32)
    else:
        pytest.skip("the CPU dry run of this test caps the address space: Linux only")
    allocated: dict[tuple[str, int], int] = {}
    finished: dict[int, FrozenTrial] = {}

    def mark(when: str, number: int) -> None:
        allocated[when, number] = torch.cuda.memory_allocated(DEVICE) if cuda else 0

    plugin = types.SimpleNamespace(
        register_source_models=autometa.hookimpl(
            lambda register: register("huge", _huge_source(budget, per_pass=10))),
        trial_started=autometa.hookimpl(lambda event: mark("started", event.number)),
        trial_finished=autometa.hookimpl(
            lambda study_name, trial, event: (mark("finished", trial.number),
                                              finished.__setitem__(trial.number, trial))))
    host = autometa.create_host(plugins={"oom-check": plugin})
    if cuda:
        # cuBLAS takes its workspace (MiBs, kept for the process) from the caching allocator
        # at its first matmul on each thread: a forward and backward here take them now,
        # not inside the trial measured.
        layer = nn.Linear(8, 8).to(DEVICE)
        layer(torch.ones(4, 8, device=DEVICE)).sum().backward()
        del layer
    with limit:  # the CPU's address-space cap (nothing on CUDA)
        board = autometa.search(
            "sinusoid", task_params={**SMALL_SINUSOID, "shots": 10, "queries": 10},
            algorithms=["maml"], sources=["huge", "mlp"], n_trials=2, initial="portfolio",
            pruner="none", meta_steps=4, eval_every=2, device=str(DEVICE),
            algorithm_params={"maml": {"strategy": "loop", "meta_batch_size": 4}},
            storage=f"sqlite:///{tmp_path / 's.db'}", artifacts=str(tmp_path / "art"),
            host=host)
    huge, mlp = finished[0], finished[1]
    assert huge.params["source"] == "huge" and huge.state.name == "FAIL"
    reason = huge.user_attrs["failure"]
    assert reason.startswith("OutOfMemoryError:") or "can't allocate memory" in reason, reason
    if cuda:
        assert "CUDA out of memory" in reason, reason
        # It held 0.6 of the card (its first activation) before the next one failed.
        assert huge.user_attrs["peak_mem_mb"] >= 0.5 * budget / 2 ** 20, huge.user_attrs
        # Back to where it started (the task's data stays on the card): within 64 MiB (a
        # workspace a library keeps), against the 0.6 of the card the trial held.
        assert abs(allocated["finished", 0] - allocated["started", 0]) <= 2 ** 26, allocated
    assert mlp.params["source"] == "mlp" and mlp.state.name == "COMPLETE"
    if cuda:
        assert mlp.user_attrs["peak_mem_mb"] > 0
    assert board.counts["complete"] == 1 and board.counts["failed"] == 1
