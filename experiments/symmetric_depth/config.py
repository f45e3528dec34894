"""Configurations of the symmetric-deep-network experiment (figure 1).

Every layer is ``serial(Dense, f, NeuronNoise)`` with all ``W_ij = coupling / N``
(rows sum to ``coupling``) and one bias per activation chosen so that the
noise-free signal is the same in every layer (see ``README.md``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    width: int = 32  # N neurons per layer (and input features)
    depth: int = 50  # layers
    noise_variance: float = 1e-3  # D of the one noise type switched on
    realizations: int = 2048  # Monte Carlo realizations per curve
    slopes: tuple = (0.5, 1.0, 1.5)  # linear activations f(x) = slope * x
    coupling: float = 1.0  # c: W_ij = c / N for the linear networks
    linear_level: float = 2.0  # noise-free output of every linear layer (and the input)
    sigmoid_coupling: float = 1.0  # c for the sigmoid network
    sigmoid_level: float = 0.5  # noise-free output of every sigmoid layer
    seed: int = 0


tiny = Config(width=8, depth=8, realizations=256)
default = Config()
full = Config(width=100, depth=50, realizations=100_000)

CONFIGS = {"tiny": tiny, "default": default, "full": full}

