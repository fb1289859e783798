"""A multilayer perceptron: flattened input -> ``layers`` x (Linear, ReLU) -> Linear head."""

from __future__ import annotations

import math

from torch import nn

from autometa import Backbone, Categorical, Int, SourceModel, TaskSpec


class MLP(SourceModel):
    input_ranks = (1, 2, 3)  # anything; inputs are flattened

    def __init__(self, *, hidden: int = 40, layers: int = 2) -> None:
        self.hidden = hidden
        self.layers = layers

    @classmethod
    def search_space(cls):
        return {"hidden": Categorical((40, 64, 128)), "layers": Int(1, 3)}

    def build(self, spec: TaskSpec) -> Backbone:
        blocks: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec.input_shape)
        for _ in range(self.layers):
            blocks += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        return Backbone(nn.Sequential(*blocks), nn.Linear(width, spec.output_size))
