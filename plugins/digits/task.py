"""Few-shot digits: N-way K-shot episodes on scikit-learn's bundled 8x8 digits.

The 10 classes are split once, by the seed, into 5 meta-train classes and 5 held-out
classes; the held-out classes' images are split in half, one half for the meta-val
episodes and the other for the meta-test episodes (same classes, disjoint images). Nothing
is downloaded: the data ships with scikit-learn.
"""

from __future__ import annotations

import torch

from autometa import Episodes, Int, Task
from autometa.episodes import ClassPool

N_TRAIN_CLASSES = 5


class Digits(Task):
    kind = "classification"
    input_shape = (1, 8, 8)
    params = {
        "ways": Int(2, 5),
        "shots": Int(1, 40),
        "queries": Int(1, 40),
        "val_episodes": Int(1, 100_000),
        "test_episodes": Int(2, 100_000),
    }

    def __init__(
        self,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        val_episodes: int = 200,
        test_episodes: int = 600,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        from sklearn.datasets import load_digits

        super().__init__(seed=seed, device=device)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.output_size = ways
        self.train_classes = N_TRAIN_CLASSES
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32, device=self.device) / 16.0
        x = x.unsqueeze(1)  # (1797, 1, 8, 8), pixels in [0, 1]
        y = torch.tensor(data.target, device=self.device)

        g = torch.Generator().manual_seed(seed)  # the split is drawn on the CPU: same everywhere
        classes = torch.randperm(10, generator=g).tolist()
        train, held_out = classes[:N_TRAIN_CLASSES], classes[N_TRAIN_CLASSES:]
        half = torch.rand(len(y), generator=g).to(self.device) < 0.5  # image -> val or test
        held = torch.isin(y, torch.tensor(held_out, device=self.device))
        self.train = ClassPool(x, y, train, name="digits meta-train")
        val = ClassPool(x[held & half], y[held & half], held_out, name="digits meta-val")
        test = ClassPool(x[held & ~half], y[held & ~half], held_out, name="digits meta-test")
        for pool in (self.train, val, test):
            pool.check(ways, shots + queries)  # fail now, not in the middle of a search
        self._val = val.sample(val_episodes, ways, shots, queries, self._generator(1))
        self._test = test.sample(test_episodes, ways, shots, queries, self._generator(2))

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def sample(self, n_tasks: int, generator: torch.Generator) -> Episodes:
        return self.train.sample(n_tasks, self.ways, self.shots, self.queries, generator)

    def sample_labelled(self, n: int, generator: torch.Generator):
        return self.train.sample_labelled(n, generator)

    def meta_val(self) -> Episodes:
        return self._val

    def meta_test(self) -> Episodes:
        return self._test
