"""The contenders of speed.py: MAML implementations, each on its own copy of the model.

Every contender takes the same initial weights and runs second-order MAML (inner SGD, Adam
meta-update at :data:`workloads.META_LR`): autometa's ``maml`` plugin (:class:`Autometa`), a
hand-written torch.func reference (:class:`Reference`) and the peers (:data:`PEERS`: higher,
TorchOpt, learn2learn), each written the way its own MAML example writes it. A peer that is
not installed is reported by :func:`missing_peer`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from workloads import META_LR, Workload, make_autometa

from autometa import Episodes


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


PEERS: dict[str, tuple[str, type[Contender]]] = {
    "higher": ("higher", Higher),
    "torchopt-metasgd": ("torchopt", TorchOptMetaSGD),
    "torchopt-functional": ("torchopt", TorchOptFunctional),
    "learn2learn": ("learn2learn", Learn2Learn),
}
ALL = ["autometa-auto", "autometa-vmap", "autometa-loop", "reference-vmap", "reference-loop",
       *PEERS]


def missing_peer(key: str) -> str | None:
    """Why a peer cannot run here (its import error), or None."""
    if key not in PEERS:
        return None
    try:
        __import__(PEERS[key][0])
    except Exception as exc:  # a peer may fail in odd ways on a new torch, not just ImportError
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return None
