"""What the experiments share: the protocol's run wrapper, datasets, noise stacks, the trained MLP.

Every experiment is a folder ``experiments/NAME/`` with ``config.py``
(``CONFIGS = {"tiny": ..., "default": ..., "full": ...}``) and ``run.py`` with
exactly ``main(config, out_dir, *, data_dir=None, progress=True) -> Result``
(:class:`noisejax.study.claims.Result`); ``noisejax reproduce`` loads both as
modules of one package, so ``run.py`` imports this file as ``from .. import _common``.

* :class:`Run` — the run wrapper: the output folder, full-precision matrix products,
  timing per stage, a progress bar, stored points (:meth:`Run.point`), figures written
  atomically (:meth:`Run.figure`), and the :class:`~noisejax.study.claims.Result`
  (also written atomically as ``out_dir/results.json``).
* :func:`dataset` — real MNIST from ``data_dir`` when it holds the IDX files, else
  scikit-learn's digits.
* :func:`one_type`, :func:`noise_stack` — one noise type at a time; several single-type
  noises stacked on a leading axis (``vmap`` over it: one compiled program).
* :func:`trained_mlp` — a sigmoid MLP trained with Adam, cached as ``.npz``.
* :func:`cli` — ``python -m experiments.NAME.run --config tiny --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from noisejax import data, layers, noise, train
from noisejax.study import files, models
from noisejax.study.claims import Claim, Result
from noisejax.study.plots import png_bytes

NOISE_TYPES = ("add_uncorrelated", "add_correlated", "mul_uncorrelated", "mul_correlated")
SHORT = {"add_uncorrelated": "AU", "add_correlated": "AC", "mul_uncorrelated": "MU", "mul_correlated": "MC"}
LABELS = {"add_uncorrelated": "additive uncorrelated", "add_correlated": "additive correlated",
          "mul_uncorrelated": "multiplicative uncorrelated", "mul_correlated": "multiplicative correlated"}


# ----------------------------------------------------------------------------------
# The run wrapper
# ----------------------------------------------------------------------------------


class Run:
    """One run of an experiment in ``out_dir``: stages timed, a progress bar, the result.

    Use as a context manager (matrix products at full float32 precision inside, unless
    ``precision=None``: on GPUs the default TF32 would add rounding noise of ~1e-3)::

        with Run("my_experiment", out_dir, steps=2, progress=progress) as run:
            model = run.stage("train", train_model, cfg)
            stats = run.point("stats", lambda: measure(model), key={"config": cfg})
            fig = run.figure("my_experiment.png", draw(stats))
            return run.result(claims, [fig], stats=stats)
    """

    def __init__(self, name: str, out_dir: Any, *, steps: int, progress: bool, precision: Optional[str] = "highest"):
        self.name, self.out = name, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.reused = 0
        self._t0 = time.perf_counter()
        self._precision = precision
        self._stack = contextlib.ExitStack()
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=name, unit="step", leave=False)

    def __enter__(self) -> "Run":
        if self._precision is not None:
            self._stack.enter_context(jax.default_matmul_precision(self._precision))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        if self._bar is not None:
            self._bar.close()

    def tick(self, n: int = 1) -> None:
        """Advance the progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def stage(self, stage: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, its wall time added to ``seconds[stage]``; advances the bar."""
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t
        self.tick()
        return value

    def point(self, name: str, compute: Callable[[], Any], *, key: Any) -> Any:
        """A finished point of ``out_dir/points`` (:func:`noisejax.study.files.cached_point`), or computed and stored.

        The point's key is ``key`` plus a digest of the experiment's sources (its folder and this
        file); the library's digest is added by ``cached_point``.
        """
        # the experiment's own sources are part of the key (the library's are already): a changed
        # measurement recomputes its points instead of reusing stale ones
        key = {"point": key, "experiment_sources": self._sources()}
        value, reused = files.cached_point(self.out / "points", name, compute, key=key)
        self.reused += int(reused)
        return value

    def _sources(self) -> str:
        here = Path(__file__).resolve().parent
        return files.sha256((files.sources_digest(here / self.name) + files.file_sha256(here / "_common.py")).encode())[:16]

    def figure(self, filename: str, fig: Any, **savefig_kwargs: Any) -> str:
        """Write a Matplotlib figure atomically as ``out_dir/filename``; returns ``filename``."""
        files.atomic_write_bytes(self.out / filename, png_bytes(fig, **savefig_kwargs))
        return filename

    def result(self, claims: Sequence[Claim], figures: Sequence[str], **values: Any) -> Result:
        """The :class:`Result` (``values`` plus the experiment's name and ``seconds``), also written to ``results.json``."""
        seconds = dict(self.seconds, total=time.perf_counter() - self._t0)
        result = Result(tuple(claims), tuple(figures), {"experiment": self.name, **values, "seconds": seconds},
                        points_reused=self.reused)
        files.atomic_write_json(self.out / "results.json", result.to_json())
        return result


def cli(main: Callable[..., Result], configs: dict, doc: Optional[str]) -> None:
    """``python -m experiments.NAME.run [--config tiny|default|full] [--out DIR] [--data-dir DIR]``."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--config", default="default", choices=tuple(configs))
    ap.add_argument("--out", required=True, help="the experiment's folder (results.json, figures, cached points)")
    ap.add_argument("--data-dir", default=None, help="folder with real MNIST IDX files (used when present)")
    a = ap.parse_args()
    result = main(configs[a.config], a.out, data_dir=a.data_dir, progress=True)
    for c in result.claims:
        verdict = "REPORTED" if c.holds is None else ("HOLDS" if c.holds else "FAILS")
        print(f"{verdict} {c.claim} — {c.measured}")
    print(f"results and figures in {a.out}")


# ----------------------------------------------------------------------------------
# Data and noise
# ----------------------------------------------------------------------------------


def has_mnist(data_dir: Optional[str]) -> bool:
    """Whether ``data_dir`` holds MNIST's IDX files (training and test images)."""
    if not data_dir:
        return False
    root = Path(data_dir)
    return any(root.glob("train-images*idx3-ubyte*")) and any(root.glob("t10k-images*idx3-ubyte*"))


def dataset(data_dir: Optional[str], *, seed: int, max_train: int, max_test: int) -> data.Dataset:
    """Real MNIST (flattened, at most ``max_train``/``max_test`` examples) when ``data_dir`` holds it, else digits."""
    if has_mnist(data_dir):
        return data.load_mnist(data_dir, seed=seed, flatten=True, max_train=max_train, max_test=max_test)
    return data.load_digits(seed=seed)


def one_type(t: str, d: Any) -> noise.NeuronNoise:
    """Noise ``t`` with variance ``d``, the other three present but zero (one pytree for all types)."""
    return noise.NeuronNoise(**{u: (d if u == t else 0.0) for u in NOISE_TYPES})


def noise_stack(d: float, types: Sequence[str] = NOISE_TYPES) -> noise.NeuronNoise:
    """``len(types)`` single-type noises of variance ``d`` stacked on axis 0 (noise ``i``: type ``types[i]`` only)."""
    eye = np.eye(len(types), dtype=np.float32) * d
    return noise.NeuronNoise(**{t: eye[i] for i, t in enumerate(types)})


# ----------------------------------------------------------------------------------
# The trained sigmoid MLP
# ----------------------------------------------------------------------------------

_NETWORKS: dict = {}
_OPTIMIZERS: dict = {}


def _network(widths: tuple):
    """``(net, jitted init, jitted clean accuracy)``, one per architecture: seeds share compiled programs."""
    if widths not in _NETWORKS:
        net = layers.mlp(list(widths), "sigmoid")
        acc = jax.jit(lambda p, x, y: train.accuracy(layers.apply_batch(net, p, x), y))
        _NETWORKS.setdefault(widths, (net, models.jit_init(net.init, static_argnums=1), acc))  # threads: the first wins
    return _NETWORKS[widths]


def _adam(lr: float) -> optax.GradientTransformation:
    """One optax object per learning rate, so same-shape networks reuse the compiled training step."""
    opt = _OPTIMIZERS.get(lr)
    return opt if opt is not None else _OPTIMIZERS.setdefault(lr, optax.adam(lr))  # threads: one object per lr


def trained_mlp(ds: data.Dataset, hidden: Sequence[int], *, steps: int, batch_size: int, learning_rate: float,
                loss: str, seed: int, train_seed: int, path: Path) -> tuple[layers.Layer, tuple, dict, bool]:
    """A sigmoid MLP ``features → hidden… → classes`` (every layer noisy) trained with Adam, cached at ``path``.

    Initialized from ``jax.random.key(seed)``, trained (:func:`noisejax.train.train_plain`)
    with minibatches from ``jax.random.key(train_seed)``; the weights are stored as
    ``.npz`` keyed by the recipe.  Returns ``(net, params, info, reused)``.
    """
    widths = [int(np.prod(ds.feature_shape))] + [int(w) for w in hidden] + [ds.n_classes]
    ident = {"widths": widths, "steps": steps, "batch_size": batch_size, "lr": learning_rate, "loss": loss,
             "seed": seed, "dataset": ds.name, "n_train": len(ds.y_train)}
    arrays = files.load_arrays(path, key=ident)
    reused = arrays is not None
    net, init, accuracy = _network(tuple(widths))
    if arrays is None:
        _, p0 = init(jax.random.key(seed), (widths[0],))
        res = train.train_plain(net, p0, ds.x_train, ds.y_train, key=jax.random.key(train_seed), loss=loss,
                                steps=steps, batch_size=batch_size, optimizer=_adam(learning_rate))
        arrays = {f"{k}{l}": np.asarray(blk[0][k]) for l, blk in enumerate(res.params) for k in ("W", "b")}
        arrays["losses"] = np.asarray(res.losses, np.float32)
        files.save_arrays(path, arrays, key=ident)
    params = tuple(({"W": jnp.asarray(arrays[f"W{l}"]), "b": jnp.asarray(arrays[f"b{l}"])}, (), ())
                   for l in range(len(widths) - 1))
    info = {"widths": widths, "dataset": ds.name, "n_train": len(ds.y_train), "n_test": len(ds.y_test),
            "clean_test_accuracy": float(accuracy(params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))),
            "final_loss": float(arrays["losses"][-1])}
    return net, params, info, reused
