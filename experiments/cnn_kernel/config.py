"""Configurations of the CNN-kernel experiment (noise in convolutional networks).

The CNN of Flax's MNIST example, trained on 8×8 digits (one network per seed); additive
noise of variance ``D`` is switched on after ONE activation, and the noise reaching the
next matrix product's outputs is measured per output channel (Monte Carlo through
``noisejax.noisy``, and ``noisejax.analytic``) against the statistics of that layer's kernel.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: tuple = (0, 1)  # one trained CNN per seed
    steps: int = 300  # Adam steps per network
    batch_size: int = 128
    learning_rate: float = 3e-3
    noise_variance: float = 1e-3  # D after the source activation
    n_inputs: int = 4  # test digits (additive noise reaching a layer does not depend on the input)
    realizations: int = 2048
    seed: int = 0  # Monte Carlo key


tiny = Config(seeds=(0,), steps=40, n_inputs=2, realizations=256)
default = Config()
full = Config(seeds=(0, 1, 2, 3), steps=2000, n_inputs=16, realizations=100_000)

CONFIGS = {"tiny": tiny, "default": default, "full": full}

