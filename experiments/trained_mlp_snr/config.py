"""Configurations of the trained-MLP experiment (figure 2).

A sigmoid MLP ``64 → hidden... → 10`` (every layer sigmoid, every layer noisy) is
trained on scikit-learn's digits (real MNIST when ``--data-dir`` holds it), then
its per-layer SNR under each of the four noise types and its accuracy vs noise
intensity are measured.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: tuple = (100, 100, 100)  # hidden widths (input and 10 outputs added)
    steps: int = 2000  # Adam steps
    batch_size: int = 128
    learning_rate: float = 3e-3
    loss: str = "mse"  # on the sigmoid outputs vs one-hot labels
    noise_variance: float = 1e-3  # D of the one noise type switched on (SNR panel)
    n_inputs: int = 32  # test inputs whose per-layer SNR is measured
    realizations: int = 2048  # Monte Carlo realizations (SNR panel)
    intensities: tuple = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # accuracy sweep
    acc_realizations: int = 16  # noise realizations per accuracy point (vmapped)
    max_train: int = 20_000  # real MNIST only: training examples used
    max_test: int = 2_000  # real MNIST only: test examples used
    seed: int = 0


tiny = Config(hidden=(16,), steps=300, learning_rate=1e-2, n_inputs=8, realizations=256, intensities=(1e-3, 1e-1), acc_realizations=4)
default = Config()
full = Config(hidden=(256, 256, 256, 256), steps=20_000, n_inputs=256, realizations=100_000,
              intensities=tuple(10.0 ** (k / 4) for k in range(-20, 1)), acc_realizations=256, max_train=60_000,
              max_test=10_000)

CONFIGS = {"tiny": tiny, "default": default, "full": full}

