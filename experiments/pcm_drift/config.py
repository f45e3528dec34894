"""Configurations of the PCM drift experiment (issue 16: analog in-memory hardware).

A digits MLP (every affine layer on PCM crossbars with aihwkit 1.1.0's periphery) and the
MNIST-1D ResNet (its weights on PCM; see the README for what is simulated) are read
1 s … 10 years after programming; accuracy ± std over programmings, plain vs hardware-aware
trained, with aihwkit-style and exact drift compensation, Monte Carlo and the analytic
prediction.  ``tiny`` runs in seconds (tests), ``default`` in a few minutes on a 2-core CPU,
``full`` is sized for an accelerator.
"""

from __future__ import annotations

import dataclasses

SECONDS = (1.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0, 3650 * 86400.0)
TIME_LABELS = ("1 s", "1 h", "1 day", "1 month", "1 year", "10 years")


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: tuple = (64, 64)  # hidden widths of the digits MLP (64 inputs, 10 outputs added)
    activation: str = "sigmoid"
    steps: int = 1500  # plain training (Adam)
    batch_size: int = 128
    learning_rate: float = 3e-3
    hwa_steps: int = 600  # hardware-aware fine-tuning from the plain model (noise_aware_loss)
    hwa_learning_rate: float = 1e-3
    hwa_realizations: int = 4  # programmings per step
    times: tuple = SECONDS
    realizations: int = 100  # programmings per (model, compensation): accuracy ± std
    n_test: int = 0  # test inputs (0: all)
    variance_realizations: int = 2000  # per-layer variance check, MC vs analytic
    variance_inputs: int = 16
    gain_realizations: int = 50  # drift-compensation gains, readout vs exact
    analytic_samples: int = 4096  # Gaussian draws of the logits per input for the analytic accuracy
    chunk: int = 25  # realizations vmapped at once
    resnet: bool = True  # the MNIST-1D ResNet (devices only)
    resnet_channels: tuple = (8, 16)
    resnet_epochs: int = 20
    resnet_samples: int = 5000
    resnet_realizations: int = 50
    resnet_hwa_steps: int = 200
    seed: int = 0


tiny = Config(hidden=(16,), steps=200, hwa_steps=10, hwa_realizations=1, realizations=4, n_test=64,
              variance_realizations=64, variance_inputs=4, gain_realizations=4, analytic_samples=256, chunk=4,
              resnet_channels=(4, 8), resnet_epochs=1, resnet_samples=600, resnet_realizations=3, resnet_hwa_steps=3)
default = Config()
full = Config(hidden=(256, 256), steps=5000, hwa_steps=3000, hwa_realizations=8, realizations=2000,
              variance_realizations=20_000, variance_inputs=64, gain_realizations=500, analytic_samples=16384,
              chunk=250, resnet_channels=(16, 32), resnet_epochs=60, resnet_realizations=1000, resnet_hwa_steps=2000)

CONFIGS = {"tiny": tiny, "default": default, "full": full}


def get_config(name: str) -> Config:
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(CONFIGS)}; got {name!r}")
    return CONFIGS[name]
