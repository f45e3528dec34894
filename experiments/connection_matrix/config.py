"""Configurations of the connection-matrix experiment (figure 3).

Several sigmoid MLPs ``64 → w → w → w → 10`` (one per hidden width and seed) are
trained on digits; noise is injected at the output of one layer and the noise
variance reaching the next layer's neurons is measured and set against the
statistics of the connection matrix between them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    widths: tuple = (32, 64, 128)  # hidden width of each trained network
    seeds: tuple = (0, 1)  # one network per (width, seed)
    n_hidden: int = 3  # hidden layers per network
    steps: int = 600  # Adam steps per network
    batch_size: int = 128
    learning_rate: float = 1e-2
    loss: str = "mse"
    noise_variance: float = 1e-3  # D at the source layer
    n_inputs: int = 1  # test inputs (additive noise reaching a layer does not depend on the input)
    realizations: int = 2048
    max_train: int = 20_000  # real MNIST only
    max_test: int = 2_000
    seed: int = 0  # Monte Carlo key


tiny = Config(widths=(8,), seeds=(0, 1), n_hidden=2, steps=100, n_inputs=1, realizations=256)
default = Config()
full = Config(widths=(32, 64, 128, 256, 512), seeds=(0, 1, 2), n_hidden=4, steps=10_000, n_inputs=4,
              realizations=100_000, max_train=60_000, max_test=10_000)

CONFIGS = {"tiny": tiny, "default": default, "full": full}

