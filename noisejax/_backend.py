"""Guards against known XLA backend miscompiles (private; called from ``noisejax/__init__.py``).

jaxlib 0.10.2's XLA:CPU hands some fusions to YNNPACK (``__ynn_fusion``).  When one
such fusion contains a *reduction* feeding a convolution or a dot whose other operand
is a *scalar broadcast* (a constant kernel), it computes garbage under
``jit(vmap(...))`` while the eager value is finite — e.g. (bare pattern)::

    conv(jnp.full(kernel_shape, c), jnp.sum(F ** 2, -1))      # 2·10³³ instead of ~60
    jnp.sum(F ** 2, -1) @ jnp.full((n, o), c)                  # NaN

once the conv / dot is large enough for YNNPACK to take it (e.g. 16 input and 32
output channels on a 14×14 map, or n ≥ 2000).  This is the weight-noise term of a
moment rule, ``σ² · Σ_j E[y_j²]`` with ``E[y²] = m² + d + Σ_r F_r²``.  Optimization
barriers around either operand do *not* prevent it; a real (non-broadcast) kernel,
a broadcast of a per-output-channel vector, or writing the scalar case as a window
sum (``lax.reduce_window``) / a plain sum does.  :mod:`noisejax.moments` uses the
latter, so noisejax's own programs avoid the pattern whatever the flags; see
:func:`noisejax.selfcheck` for a run-time check on any backend.

:func:`apply_xla_guard` (run when ``noisejax`` is imported) appends
``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusion, which makes
jit and eager agree) to ``XLA_FLAGS`` when

* the installed jaxlib is in :data:`AFFECTED_JAXLIB` (``0.10.2 <= version < 0.12``:
  verified on 0.10.2; 0.11.0 ships the same fusion — jax-ml/jax#39257), and
* the user has not set that flag in ``XLA_FLAGS`` (an explicit setting always wins), and
* ``NOISEJAX_XLA_GUARD`` is not ``0`` (the opt-out, e.g. to reproduce the bug), and
* no JAX backend has been initialized yet: XLA reads ``XLA_FLAGS`` once, when the
  first backend starts.  Import noisejax before running any JAX computation, or
  set the flag yourself.  When it is too late on an affected CPU setup, a
  :class:`RuntimeWarning` says so.

Outside the affected range the flag is not set: XLA aborts the process on a flag it
does not know, and the flag's name is experimental.  The same variable affects the
processes noisejax's users start from Python (``os.environ`` is inherited).

A new moment rule should avoid the pattern in its own programs too: never convolve or
``dot`` a reduction (e.g. ``m² + d + Σ_r F_r²``) with a broadcast *scalar* (``jnp.full``,
``broadcast_to(σ², W.shape)``); write a scalar (or per-output) variance as a plain sum
(Dense: ``σ² · Σ_j E[y_j²]``) or a window sum (Conv: :func:`noisejax.moments.window_sum`),
as ``moments._dense_weight_noise_term`` and ``moments._conv_weight_noise_term`` do.  The
selfcheck's ``known-miscompiles`` check runs both bare patterns.

A performance trap (not a wrong number), handled by :func:`loops_slow_down`: XLA:CPU leaves
the **kernel gradient of a convolution** in its non-canonical form (``dim_labels
f01b_i01o->01bf``) when it sits inside a ``while`` loop (``lax.scan``/``fori_loop``) and
runs it through its naive loop emitter, 30–100× slower than the same convolution at the
top level of a program (jaxlib 0.10.2: 37.6 ms instead of 0.31 ms for a 3×3, 32→64
channel kernel gradient on 128 4×4 maps; the Flax MNIST CNN's training step 44 ms
instead of 1.6 ms). :func:`noisejax.train.fit` therefore runs one compiled step per
dispatch, without a loop, when its objective contains a convolution on the CPU.

The converse trap, handled by :func:`batched_kernels_slow`: ``vmap`` of a convolution over
*different kernels* (noise realizations of the weights, a grid of denoisers) becomes one
grouped convolution (``feature_group_count`` = the batch), which XLA:CPU runs 2–3× slower
than a loop over the kernels (a ResNet-1D on 1000 MNIST-1D inputs, 8 kernel sets: 67.7 ms
vmapped, 20.9 ms in ``lax.map``, 3.5 ms for one set).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Callable, Mapping, MutableMapping, Optional

__all__ = [
    "FLAG", "AFFECTED_JAXLIB", "OPT_OUT_ENV", "jaxlib_version", "is_affected", "apply_xla_guard", "guard_status",
    "uses_primitive", "loops_slow_down", "batched_kernels_slow", "HOST_DEVICES_FLAG", "use_host_devices",
    "ONCE_COMPILER_OPTIONS", "once_compiler_options",
]

#: the XLA flag and the value that avoids the miscompile (empty list: no YNNPACK fusion)
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_SETTING = FLAG + "="
#: jaxlib versions ``[low, high)`` on which the guard applies the flag
AFFECTED_JAXLIB = ((0, 10, 2), (0, 12, 0))
#: ``NOISEJAX_XLA_GUARD=0`` disables the guard
OPT_OUT_ENV = "NOISEJAX_XLA_GUARD"

_STATUS: dict = {"status": "not-run", "detail": ""}


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group(0)) if m else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def jaxlib_version() -> Optional[tuple[int, ...]]:
    """Installed jaxlib version as ``(major, minor, patch)``, read without importing jax (None if absent)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return _parse_version(version("jaxlib"))
    except PackageNotFoundError:
        return None


def is_affected(version: Optional[tuple[int, ...]] = None) -> bool:
    """Whether ``version`` (default: the installed jaxlib) is in :data:`AFFECTED_JAXLIB`."""
    v = jaxlib_version() if version is None else tuple(version)
    if v is None:
        return False
    lo, hi = AFFECTED_JAXLIB
    return lo <= v < hi


def _user_set(flags: str) -> bool:
    return re.search(re.escape(FLAG) + r"(=|\s|$)", flags) is not None


def _backends_initialized() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    probe = getattr(bridge, "backends_are_initialized", None)
    if probe is None:  # pragma: no cover - older jax
        return bool(getattr(bridge, "_backends", {}))
    return bool(probe())


def _cpu_in_use() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
    if platforms:
        return "cpu" in platforms.lower().split(",")
    try:
        import jax

        return jax.default_backend() == "cpu"
    except Exception:  # pragma: no cover
        return True


def apply_xla_guard(environ: Optional[MutableMapping[str, str]] = None, *, warn: bool = True) -> str:
    """Append the working XLA flag to ``XLA_FLAGS`` when needed; return what happened.

    Returns one of ``"applied"`` (flag appended), ``"already-applied"``, ``"user-set"``
    (``XLA_FLAGS`` names the flag: left alone), ``"not-affected"`` (jaxlib outside
    :data:`AFFECTED_JAXLIB`), ``"disabled"`` (``NOISEJAX_XLA_GUARD=0``) or
    ``"too-late"`` (a JAX backend is already running; the flag would be ignored, so
    it is not set — a :class:`RuntimeWarning` is issued when the CPU backend is in use).
    Idempotent; safe to call from any module before its first JAX computation.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if _STATUS["status"] == "applied" and _SETTING in flags.split():
        return _record("already-applied", flags)
    if env.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return _record("disabled", f"{OPT_OUT_ENV}={env.get(OPT_OUT_ENV)}")
    if _user_set(flags):
        return _record("user-set", flags)
    if not is_affected():
        return _record("not-affected", f"jaxlib {jaxlib_version()}")
    if environ is None and _backends_initialized():
        if warn and _cpu_in_use():
            warnings.warn(
                f"noisejax: jaxlib {'.'.join(map(str, jaxlib_version()))} can miscompile reductions feeding a "
                f"constant-kernel conv/dot on CPU under jit(vmap); JAX was initialized before noisejax was imported, "
                f"so the fix ({_SETTING!r} in XLA_FLAGS) cannot be applied. noisejax's own programs avoid the "
                f"pattern; set XLA_FLAGS={_SETTING} before starting Python (or import noisejax first) for yours",
                RuntimeWarning,
                stacklevel=3,
            )
        return _record("too-late", "a JAX backend was initialized before noisejax was imported")
    env["XLA_FLAGS"] = (flags + " " + _SETTING).strip()
    return _record("applied", env["XLA_FLAGS"])


def _record(status: str, detail: str) -> str:
    _STATUS.update(status=status, detail=detail)
    return status


def guard_status() -> Mapping[str, str]:
    """``{"status", "detail", "jaxlib", "xla_flags"}`` of the last :func:`apply_xla_guard` call."""
    v = jaxlib_version()
    return {
        **_STATUS,
        "jaxlib": "absent" if v is None else ".".join(map(str, v)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# ----------------------------------------------------------------------------------
# Performance traps
# ----------------------------------------------------------------------------------


def uses_primitive(jaxpr, names, where: Optional[Callable[[Any], bool]] = None) -> bool:
    """Whether ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``) or a jaxpr nested in its equations uses a primitive in ``names``
    (with ``where(eqn)`` true, when given)."""
    names = frozenset(names)
    todo, seen = [getattr(jaxpr, "jaxpr", jaxpr)], set()
    while todo:
        j = todo.pop()
        if id(j) in seen:
            continue
        seen.add(id(j))
        for eqn in j.eqns:
            if eqn.primitive.name in names and (where is None or where(eqn)):
                return True
            for value in eqn.params.values():
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(v, "jaxpr", v)
                    if hasattr(sub, "eqns"):
                        todo.append(sub)
    return False


def _spatial_2d(eqn) -> bool:
    """A convolution with two or more spatial dimensions (its lhs spec names batch, feature and the spatial dims)."""
    dn = eqn.params.get("dimension_numbers")
    spec = getattr(dn, "lhs_spec", None)
    return spec is None or len(spec) >= 4


def loops_slow_down(jaxpr, backend: Optional[str] = None) -> bool:
    """Whether a training step with this ``jaxpr`` should run outside ``lax.scan`` on ``backend`` (default: JAX's).

    True on the CPU when the step contains a convolution with two or more spatial
    dimensions: its kernel gradient inside a ``while`` loop takes XLA:CPU's naive emitter,
    30–100× slower (see the module docstring).  One-dimensional convolutions lose a
    factor of 3–7 on a part that is small beside the rest of the step (a ResNet-1D on
    MNIST-1D trains in the same time either way), so their steps keep the scan.
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
    return backend == "cpu" and uses_primitive(jaxpr, {"conv_general_dilated"}, _spatial_2d)


def batched_kernels_slow(jaxpr, backend: Optional[str] = None) -> bool:
    """Whether ``jaxpr`` should be looped (``lax.map``), not ``vmap``-ped, over sets of its weights on ``backend``.

    True on the CPU when it contains a convolution: vmapped over kernels it becomes a
    grouped convolution that XLA:CPU runs 2–3× slower than the loop (module docstring).
    Elsewhere ``vmap`` keeps the accelerator busy.  A forward pass only: inside a loop a
    *kernel gradient* is the slow one (:func:`loops_slow_down`).
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
    return backend == "cpu" and uses_primitive(jaxpr, {"conv_general_dilated"})


#: compiler options for a program that runs once (an initializer): LLVM at -O1 instead of -O2
ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def once_compiler_options(backend: Optional[str] = None) -> Optional[dict]:
    """``compiler_options`` for ``jax.jit`` of a program run once, whose compile time is all that counts.

    On the CPU: :data:`ONCE_COMPILER_OPTIONS` (jaxlib 0.10.2: a Flax ResNet-1D's ``init``
    compiles in 0.4 s instead of 1.6 s, an MLP's in 0.2 s instead of 0.5 s, the same numbers
    bit for bit: tested against the eager call).  Elsewhere ``None`` (the backend's
    defaults).  Not for programs that run many times: ``-O1`` skips LLVM's vectorizers.
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
    return dict(ONCE_COMPILER_OPTIONS) if backend == "cpu" else None


# ----------------------------------------------------------------------------------
# CPU cores as devices
# ----------------------------------------------------------------------------------

#: the XLA flag that splits the CPU into several JAX devices
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def use_host_devices(n: Optional[int] = None, environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Let JAX see the CPU as ``n`` devices (default: the largest power of two ≤ the cores, at most 8).

    XLA runs a program on one CPU device from one thread (plus the intra-op threads of its
    large matrix products); a computation sharded over several CPU devices
    (:func:`noisejax.simulate.monte_carlo`'s streams, :func:`noisejax.federated.run`'s runs)
    runs its shards side by side.  Results do not depend on the device count.  Set before
    JAX starts (``XLA_FLAGS`` is read once); left alone when ``XLA_FLAGS`` already names the
    flag, when ``n`` would be 1, or when a backend is running.  A power of two keeps the
    Monte Carlo engine's default 8 streams divisible.  Accelerators are unaffected (the
    host devices are only used when asked for).

    Returns ``"set"``, ``"user-set"``, ``"single-core"`` or ``"too-late"``.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if HOST_DEVICES_FLAG in flags:
        return "user-set"
    if n is None:
        cores = min(os.cpu_count() or 1, 8)
        n = 1 << (cores.bit_length() - 1)
    if n <= 1:
        return "single-core"
    if environ is None and _backends_initialized():
        return "too-late"
    env["XLA_FLAGS"] = (flags + f" {HOST_DEVICES_FLAG}={int(n)}").strip()
    return "set"
