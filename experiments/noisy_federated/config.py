"""Configurations of the noisy federated-training experiment (Shao, Liew & Gündüz 2023, noisy training).

``tiny()`` runs in seconds (tests), ``default()`` in a few minutes on a 2-core CPU,
``full()`` is the GPU-sized run (more WNR points, seeds, and the BatchNorm CNN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from noisejax.federated import FederatedConfig
from noisejax.study.models import ModelConfig

__all__ = ["FedSpec", "Config", "CONFIGS"]


@dataclass(frozen=True)
class FedSpec:
    """One model: its architecture (``model``; only the architecture and seed are used —
    training is federated), the protocol ``fed`` (its ``denoiser`` field is overridden
    for each curve) and the WNR grid."""

    name: str
    model: ModelConfig
    fed: FederatedConfig
    wnr_db: tuple[float, ...]


@dataclass(frozen=True)
class Config:
    """Attributes:
      specs: the models.
      denoisers: server denoisers compared (ML is the baseline).
      n_seeds: independent federated runs per WNR point (mean ± std).
      targets: accuracies at which dB gains are read off (final test accuracy).
      seed: base key.
    """

    specs: tuple[FedSpec, ...]
    denoisers: tuple[str, ...] = ("ml", "mmse", "compensated", "learned")
    n_seeds: int = 1
    targets: tuple[float, ...] = (0.6, 0.8)
    seed: int = 0

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


MLP = ModelConfig(kind="mlp", dataset="digits", widths=(64, 64), activation="relu")
FED = FederatedConfig(
    n_devices=20, n_active=4, rounds=100, eval_every=10, shards_per_device=4, local_epochs=5, local_batch=16,
    local_lr=0.1, local_optimizer="sgd", reference="power", scope="global",
)


def _wnr(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = int(round((hi - lo) / step)) + 1
    return tuple(float(lo + i * step) for i in range(n))


def default() -> Config:
    return Config(
        specs=(FedSpec("mlp_digits", MLP, FED, _wnr(-37.5, -17.5, 1.25)),),
        n_seeds=2,
    )


def full() -> Config:
    cnn = ModelConfig(kind="resnet1d", dataset="mnist1d", stage_channels=(16, 32), n_samples=5000)
    fed_cnn = dataclasses.replace(FED, local_batch=32, local_lr=0.1, local_epochs=3)
    return Config(
        specs=(
            FedSpec("mlp_digits", MLP, FED, _wnr(-40.0, -15.0, 1.25)),
            FedSpec("resnet1d_mnist1d", cnn, fed_cnn, _wnr(-40.0, 0.0, 2.5)),
        ),
        n_seeds=3,
    )


def tiny() -> Config:
    mlp = ModelConfig(kind="mlp", dataset="digits", widths=(16,), activation="relu")
    fed = dataclasses.replace(FED, n_devices=6, n_active=2, rounds=4, eval_every=2, local_epochs=1, local_batch=32,
                              learned_steps=2, grid_lams=(0.5, 1.0), grid_betas=(0.0,))
    return Config(specs=(FedSpec("mlp_tiny", mlp, fed, (-10.0, 10.0)),), n_seeds=1)


CONFIGS = {"tiny": tiny(), "default": default(), "full": full()}
