"""Sinusoid regression (Finn et al. 2017, section 5.1).

Each task is ``y = A * sin(x - phase)`` with amplitude A ~ U[0.1, 5], phase ~ U[0, pi] and
inputs x ~ U[-5, 5]. K-shot regression, scored by mean squared error (lower is better).
"""

from __future__ import annotations

import math

import torch

from autometa import Episodes, Int, Task


class Sinusoid(Task):
    kind = "regression"
    input_shape = (1,)
    output_size = 1
    params = {  # validated by the engine before the task is built
        "shots": Int(1, 1000),
        "queries": Int(1, 1000),
        "eval_queries": Int(1, 10_000),
        "val_episodes": Int(1, 100_000),
        "test_episodes": Int(2, 100_000),
    }

    def __init__(
        self,
        *,
        shots: int = 10,
        queries: int = 10,
        eval_queries: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(seed=seed, device=device)
        self.shots = shots  # support points per task (K)
        self.queries = queries  # query points per meta-train task
        # Fixed evaluation episodes, drawn once from generators derived from the seed.
        self._val = self._episodes(val_episodes, eval_queries, self._generator(1))
        self._test = self._episodes(test_episodes, eval_queries, self._generator(2))

    def _generator(self, stream: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + stream)
        return g

    def _episodes(self, n_tasks: int, n_query: int, g: torch.Generator) -> Episodes:
        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape, generator=g, device=self.device)

        amplitude = uniform(0.1, 5.0, n_tasks, 1, 1)  # (tasks, 1, 1)
        phase = uniform(0.0, math.pi, n_tasks, 1, 1)
        x = uniform(-5.0, 5.0, n_tasks, self.shots + n_query, 1)  # (tasks, K + Q, 1)
        y = amplitude * torch.sin(x - phase)
        k = self.shots
        return Episodes(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self._episodes(n_tasks, self.queries, generator)

    def meta_val(self) -> Episodes:
        return self._val

    def meta_test(self) -> Episodes:
        return self._test
