"""Configurations of the mitigation experiment: ``tiny`` (tests), ``default`` (CPU), ``full`` (GPU).

Noise intensities are variances ``D`` of the four neuron-noise types of Semenova,
Larger & Brunner (2022); the grid of each type starts at 0 (clean).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Config", "NOISE_TYPES", "CONFIGS"]

NOISE_TYPES = ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the run depends on (saved in the results JSON).

    Attributes:
      widths: MLP widths, input first (digits: 64 features, 10 classes).
      activation, activation_out: hidden and output activations (the output is
        read as logits of a softmax cross-entropy).
      noise_sites: ``"all"`` (every layer, output included, as in the paper) or
        ``"hidden"`` (hidden layers only).
      grids: one tuple of variances per noise type (same order as ``NOISE_TYPES``).
      min_loss: the target intensity of a type is the smallest grid value at which
        the plain network loses at least this much accuracy on the *validation* set.
      pool_copies: ``P`` for pooling (every noisy layer, averaging read-out at the end).
      train_realizations: noise realizations per step of noise-aware training.
      penalties: λ grid of moment-regularized training, chosen on validation.
      eval_realizations: noise realizations per accuracy estimate.
      slope_scales: factors ``s`` of the slope-scaling report (hidden layers).
      rng: ``"fast"`` (noisejax.rng), ``"threefry"`` or ``"rbg"``.
    """

    seed: int = 0
    rng: str = "fast"
    widths: tuple[int, ...] = (64, 32, 10)
    activation: str = "sigmoid"
    activation_out: str = "linear"
    noise_sites: str = "all"
    steps: int = 1500
    batch_size: Optional[int] = 128
    learning_rate: float = 1e-2
    train_realizations: int = 8
    penalties: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    moments_method: str = "gaussian"
    moments_covariance: str = "factored"
    pool_copies: int = 4
    eval_realizations: int = 32
    grids: tuple[tuple[float, ...], ...] = (
        (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0),
        (0.0, 0.3, 1.0, 3.0, 10.0, 30.0),
        (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0),
        (0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0),
    )
    min_loss: float = 0.10
    slope_scales: tuple[float, ...] = (0.5, 2.0)

    def grid(self, noise_type: str) -> tuple[float, ...]:
        return self.grids[NOISE_TYPES.index(noise_type)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tiny() -> Config:
    """Seconds: a handful of steps and grid points (for tests; numbers are meaningless)."""
    return Config(
        widths=(64, 8, 10),
        steps=30,
        batch_size=64,
        train_realizations=2,
        penalties=(0.01,),
        pool_copies=2,
        eval_realizations=4,
        grids=((0.0, 0.3), (0.0, 10.0), (0.0, 0.3), (0.0, 0.3)),
        slope_scales=(2.0,),
    )


def default() -> Config:
    """About 1–3 minutes on a 2-core CPU."""
    return Config()


def full() -> Config:
    """GPU: longer training, more realizations, finer grids."""
    return Config(
        widths=(64, 64, 10),
        steps=10000,
        train_realizations=64,
        penalties=(0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
        pool_copies=4,
        eval_realizations=1024,
        grids=(
            (0.0, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
            (0.0, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 100.0),
            (0.0, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
            (0.0, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
        ),
        slope_scales=(0.25, 0.5, 2.0, 4.0),
    )


CONFIGS = {"tiny": tiny(), "default": default(), "full": full()}
