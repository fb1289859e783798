"""Raw: the task's inputs, flattened, are the features.

``features`` is ``nn.Flatten()`` (no parameter): (n, *input_shape) -> (n, prod(input_shape)).
The contract's ``head`` is a linear layer (prod(input_shape) -> output_size), so an
algorithm that adapts a head (MAML, ANIL, fine-tuning) learns a linear model of the inputs;
one that uses the features alone (``nearest-centroid``, ``linear-probe``, ``linear-svm``)
is then "a few lines of scikit-learn on raw pixels", the baseline any meta-learner must
beat (Chen et al. 2019, "A Closer Look at Few-shot Classification", and Tian et al. 2020
report such baselines). Every input rank is accepted.

``pretrained_features`` is True: its features need no training, so a search runs the
baseline algorithms on it (README, Baselines).
"""

from __future__ import annotations

import math

from torch import nn

from autometa import Backbone, SourceModel, TaskSpec


class Raw(SourceModel):
    input_ranks = (1, 2, 3)  # listed by `autometa plugins`; any rank is served
    pretrained_features = True

    @classmethod
    def incompatibility(cls, spec: TaskSpec) -> str | None:
        return None  # inputs of any rank flatten

    def build(self, spec: TaskSpec) -> Backbone:
        width = math.prod(spec.input_shape)
        return Backbone(nn.Flatten(), nn.Linear(width, spec.output_size))
