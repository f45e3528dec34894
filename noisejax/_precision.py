"""Where float32 accumulation limits Monte Carlo statistics (private; used by ``simulate.monte_carlo``).

``monte_carlo`` accumulates in the dtype of ``fn``'s output.  Its errors relative to exact
(float64) statistics of the same samples, measured (``docs/precision.md``) and bounded here:

* **mean**, in standard errors ``σ/√n``, with ``r = |mean|/σ``::

      B_mean = ε (r + 1) √n · (1 + 0.15 (√T + √(n / (T S))))

  (``ε`` the dtype's machine epsilon, ``T = tile_size``, ``S = streams``): one ulp of the
  result plus the rounding of the tile sums and of the ``n / (T S)`` sequential merges
  per stream.  It grows with the offset of the output over its noise (``r``: the SNR as an
  amplitude ratio) and with ``n``.
* **variance**, in standard deviations of a sample variance ``σ² √(2/n)``::

      B_var = ε √(n/2) · (0.25 (r + 1) + √(n / (T S)))

Every measurement of ``docs/precision.md`` (float32, ``r`` 0–10⁵, ``n`` 10⁴–4·10⁶,
``T`` 64–1024, ``S`` 8–64) is below its bound (5–72 % of it where the error exceeds 0.1
standard errors); beyond 4·10⁶ realizations they extrapolate the measured growth.  :func:`check_result` lists the output leaves
where either bound exceeds one standard error (entries whose std is below 8 ulps of their
mean count as noise-free and are left out); ``monte_carlo`` turns them into
:class:`noisejax.errors.PrecisionWarning`.  Remedies: return the deviation from a
reference (e.g. ``fn(k) - clean_output``: ``r`` near 0), a larger ``tile_size`` or more
``streams`` (fewer sequential merges), or float64 (``JAX_ENABLE_X64=1``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []

#: the realization count is accumulated in int32
MAX_REALIZATIONS = 2**31 - 1


def mean_error_bound(ratio: float, n: int, tile: int, streams: int, eps: float) -> float:
    """``B_mean`` (standard errors) for ``|mean|/σ = ratio``."""
    return eps * (ratio + 1.0) * math.sqrt(n) * (1.0 + 0.15 * (math.sqrt(tile) + math.sqrt(n / (tile * streams))))


def var_error_bound(ratio: float, n: int, tile: int, streams: int, eps: float) -> float:
    """``B_var`` (standard deviations of the sample variance) for ``|mean|/σ = ratio``."""
    return eps * math.sqrt(n / 2.0) * (0.25 * (ratio + 1.0) + math.sqrt(n / (tile * streams)))


#: entries whose std is below this many ulps of their mean are taken as noise-free: their
#: "variance" is the rounding of a (near-)deterministic value, not noise (docs/precision.md)
RESOLUTION_ULPS = 8.0


@jax.jit
def _max_ratios(mean: Any, var: Any) -> list:
    def one(m, v):
        if not m.size:
            return jnp.zeros((), m.dtype)
        sd = jnp.sqrt(jnp.maximum(v, 0))
        noisy = sd > RESOLUTION_ULPS * jnp.finfo(m.dtype).eps * jnp.abs(m)
        return jnp.max(jnp.where(noisy, jnp.abs(m) / jnp.where(noisy, sd, 1), 0))

    return [one(m, v) for m, v in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(var))]


def check_result(result: Any, n: int, tile: int, streams: int, limit: float = 1.0) -> list[str]:
    """One message per output leaf whose mean or variance may be off by more than ``limit`` standard errors."""
    paths = [jax.tree_util.keystr(p) or "<output>" for p, _ in jax.tree_util.tree_flatten_with_path(result.mean)[0]]
    leaves = jax.tree_util.tree_leaves(result.mean)
    ratios = [float(r) for r in jax.device_get(_max_ratios(result.mean, result.var))]
    out = []
    for path, leaf, ratio in zip(paths, leaves, ratios):
        if not np.isfinite(ratio):
            continue  # non-finite statistics: check_finite's business
        eps = float(jnp.finfo(leaf.dtype).eps)
        bm = mean_error_bound(ratio, n, tile, streams, eps)
        bv = var_error_bound(ratio, n, tile, streams, eps)
        if max(bm, bv) > limit:
            out.append(
                f"monte_carlo: {jnp.dtype(leaf.dtype).name} accumulation may shift output leaf {path} by up to "
                f"{bm:.2g} standard errors (mean) and {bv:.2g} (variance): |mean|/std up to {ratio:.3g}, "
                f"{n} realizations, tile_size={tile}, streams={streams}. Return deviations from a reference "
                f"(fn(k) - clean output), raise tile_size or streams, or use float64 (JAX_ENABLE_X64=1); "
                f"see docs/precision.md"
            )
    return out
