"""Configurations of the noisy-inference experiment (Shao, Liew & Gündüz 2023, noisy inference).

``tiny()`` runs in seconds (tests), ``default()`` in a few minutes on a 2-core CPU,
``full()`` is the GPU-sized run (more WNR points, realizations and training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from noisejax.study.models import ModelConfig

__all__ = ["ModelSpec", "Config", "CONFIGS"]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the experiment: its recipe, the WNR grid and the learned denoiser's WNR range."""

    name: str
    model: ModelConfig
    wnr_db: tuple[float, ...]
    learned_wnr_range: tuple[float, float]


@dataclass(frozen=True)
class Config:
    """Everything the runner needs (all plain values; ``dataclasses.replace`` to tweak).

    Attributes:
      specs: the models.
      n_realizations: noise realizations per WNR point for the reported curves (R).
      grid_realizations: realizations per WNR point for the (λ', β) grid search.
      grid_lams, grid_betas: the compensated-MMSE grid (all pairs).
      reference, scope: WNR definition (``noise.noise_power``).
      learned_per_channel: per-output-channel coefficients for the learned denoiser.
      learned_variants: which learned denoisers to train: ``"affine"`` (per-layer affine
        map only), ``"common"`` (plus the blind common-mode MMSE with a learned exponent;
        no side information) and/or ``"projection"`` (plus the common-mode projection,
        whose per-channel targets are side information).
      authors_form: also select (validation split, same grid and noise realizations) and report
        the authors' published closed form of the compensated MMSE (``denoise.MMSEpb``:
        global clean-weight variance, no fallback); costs one more compiled grid call per model.
      recalibrate: for BatchNorm models, also evaluate ML, the selected compensated MMSE
        and the ``"common"`` learned denoiser followed by a re-estimation of the batch
        statistics on the (unlabeled) validation inputs; that learned denoiser is then
        trained with the re-estimation in its loss.
      learned_steps, learned_draws, learned_batch, learned_lr: its optax training
        (on the validation split; never the test split).
      targets: accuracies at which dB gains are read off.
    """

    specs: tuple[ModelSpec, ...]
    n_realizations: int = 20
    grid_realizations: int = 8
    grid_lams: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
    grid_betas: tuple[float, ...] = (-3.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.3)
    reference: str = "variance"
    scope: str = "global"
    learned_per_channel: bool = False
    learned_variants: tuple[str, ...] = ("affine", "common", "projection")
    authors_form: bool = True
    recalibrate: bool = True
    learned_steps: int = 300
    learned_draws: int = 8
    learned_batch: int = 128
    learned_lr: float = 0.02
    targets: tuple[float, ...] = (0.6, 0.8)
    seed: int = 0

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


def _wnr(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = int(round((hi - lo) / step)) + 1
    return tuple(float(lo + i * step) for i in range(n))


MLP = ModelConfig(kind="mlp", dataset="digits", widths=(64, 64), activation="sigmoid", epochs=60)
CNN = ModelConfig(
    kind="resnet1d", dataset="mnist1d", stage_channels=(16, 32), blocks_per_stage=1, n_samples=5000, epochs=30
)


def default() -> Config:
    cnn = dataclasses.replace(CNN, stage_channels=(8, 16), epochs=20)
    return Config(
        specs=(
            ModelSpec("mlp_digits", MLP, _wnr(-8.0, 12.0, 2.0), (-8.0, 8.0)),
            ModelSpec("resnet1d_mnist1d", cnn, _wnr(4.0, 28.0, 2.0), (8.0, 24.0)),
        ),
        n_realizations=20,
        grid_realizations=4,
        grid_lams=(0.0, 0.5, 0.9, 1.0),
        grid_betas=(-1.0, -0.5, -0.25, -0.1, 0.0, 0.1),
        learned_steps=120,
        learned_draws=4,
        learned_batch=64,
        learned_lr=0.02,
    )


def full() -> Config:
    cnn = dataclasses.replace(CNN, epochs=60)
    return Config(
        specs=(
            ModelSpec("mlp_digits", MLP, _wnr(-10.0, 14.0, 1.0), (-8.0, 8.0)),
            ModelSpec("resnet1d_mnist1d", cnn, _wnr(0.0, 24.0, 1.0), (6.0, 22.0)),
        ),
        n_realizations=50,
        grid_realizations=20,
        grid_lams=(0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
        grid_betas=(-5.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3),
        learned_steps=1000,
        learned_draws=16,
        learned_batch=256,
        learned_lr=0.01,
    )


def tiny() -> Config:
    mlp = ModelConfig(kind="mlp", dataset="digits", widths=(16,), activation="sigmoid", epochs=3)
    return Config(
        specs=(ModelSpec("mlp_tiny", mlp, (-4.0, 4.0, 12.0), (-6.0, 14.0)),),
        n_realizations=3,
        grid_realizations=2,
        grid_lams=(0.5, 1.0),
        grid_betas=(-0.5, 0.0),
        learned_steps=3,
        learned_draws=2,
        learned_batch=32,
        learned_variants=("common", "projection"),
    )


CONFIGS = {"tiny": tiny(), "default": default(), "full": full()}
