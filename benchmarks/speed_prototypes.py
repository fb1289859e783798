"""Proposed patches to autometa, prototyped on top of its real toolkit for speed.py.

The plugin and autometa/inner_loop.py are unchanged; ``--prototypes`` times each patch
beside the unpatched contender it modifies (:data:`PROTOTYPE_BASE`).
"""

from __future__ import annotations

import torch
from speed_contenders import Autometa, Contender
from torch import nn
from workloads import META_LR, Workload

from autometa import Episodes


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


class ProtoConv4Plain(Autometa):
    """The conv4 plugin's previous block (NCHW; conv, BatchNorm, ReLU, max-pool): what its
    channels_last, pool-before-ReLU layout is measured against (the same parameters)."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        super().__init__(model, work, steps, "auto")
        self.label, self.strategy = "proto: conv4 plain NCHW blocks", "auto"
        for seq in self.algorithm.model.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            for conv in seq:
                if type(conv).__name__ == "ChannelsLastConv2d":
                    conv.__class__ = nn.Conv2d  # the same parameters, NCHW output
            keys = list(seq._modules)
            for a, b in zip(keys, keys[1:], strict=False):  # (max-pool, ReLU) -> back
                if (isinstance(seq._modules[a], nn.MaxPool2d)
                        and isinstance(seq._modules[b], nn.ReLU)):
                    seq._modules[a], seq._modules[b] = seq._modules[b], seq._modules[a]


class ProtoUnfused(Autometa):
    """Every pass through the model's own modules, as before ``autometa.fused_blocks``: a
    forward hook that does nothing keeps the inner loop off its fast paths (a hooked model
    is not a chain it runs itself, ``autometa.source_model.chain_leaves``)."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        super().__init__(model, work, steps, "auto")
        self.label, self.strategy = "proto: passes unfused", "auto"
        self.algorithm.model.register_forward_hook(lambda *_: None)


class ProtoUnfusedSupport(Autometa):
    """The query pass fused but the support passes through the model's own modules
    (BatchNorm's native double backward), as before
    ``fused_blocks.DifferentiableBatchNormMaxPool``: ``fused_blocks.try_forward`` declines
    the support passes for the length of this contender's step."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        super().__init__(model, work, steps, "auto")
        self.label, self.strategy = "proto: support passes unfused (previous)", "auto"

    def step(self, batch: Episodes) -> None:
        from autometa import fused_blocks

        fused = fused_blocks.try_forward

        def query_only(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                       *, higher_order: bool = False) -> torch.Tensor | None:
            return None if higher_order else fused(model, params, x)

        fused_blocks.try_forward = query_only  # type: ignore[assignment]
        try:
            super().step(batch)
        finally:
            fused_blocks.try_forward = fused


class ProtoVmapPerceptron(Autometa):
    """The toolkit's previous path for a perceptron: ``torch.func.vmap`` of each episode's
    adaptation (``torch.func.grad`` steps), which ``autometa.stacked`` replaced."""

    def __init__(self, model: nn.Module, work: Workload, steps: int) -> None:
        super().__init__(model, work, steps, "vmap")
        self.label, self.strategy = "proto: vmap of torch.func (previous)", "vmap"

    def step(self, batch: Episodes) -> None:
        from torch.func import functional_call, vmap

        from autometa.inner_loop import adapt, parameters_of

        alg = self.algorithm
        params = parameters_of(alg.model)

        def one(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            fast = adapt(alg.model, params, sx, sy, alg.task.loss, steps=alg.inner_steps,
                         lr=alg.inner_lr, first_order=alg.first_order)
            return functional_call(alg.model, fast, (qx,))

        loss = alg.task.loss(vmap(one)(batch.support_x, batch.support_y, batch.query_x),
                             batch.query_y)
        alg.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        alg.optimizer.step()


#: Prototypes left out on a workload, and why.
PROTOTYPE_SKIP = {("proto-compile", "conv4"): "vmap is slower and wrong with BatchNorm there",
                  ("proto-conv4-plain", "sinusoid"): "a conv4 layout",
                  ("proto-unfused", "sinusoid"): "no BatchNorm or max-pool to fuse",
                  ("proto-unfused-support", "sinusoid"): "no BatchNorm or max-pool to fuse",
                  ("proto-vmap-perceptron", "conv4"): "a perceptron's path"}

PROTOTYPES: dict[str, type[Contender]] = {
    "proto-fused-adam": ProtoFusedAdam,
    "proto-compile": ProtoCompiled,
    "proto-conv4-plain": ProtoConv4Plain,
    "proto-unfused": ProtoUnfused,
    "proto-unfused-support": ProtoUnfusedSupport,
    "proto-vmap-perceptron": ProtoVmapPerceptron,
}


#: What each prototype is compared with: the unpatched contender it modifies.
PROTOTYPE_BASE = {"proto-fused-adam": "autometa-auto", "proto-compile": "autometa-vmap",
                  "proto-conv4-plain": "autometa-auto", "proto-vmap-perceptron": "autometa-auto",
                  "proto-unfused": "autometa-auto", "proto-unfused-support": "autometa-auto"}
