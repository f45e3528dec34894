r"""The analog chip in any JAX model: PCM weights at a time ``t`` and crossbars at the products.

:class:`AnalogHardware` (devices, periphery, tiles, drift compensation) plays the two roles
:func:`noisejax.noisy` and :func:`noisejax.analytic` know, so a Flax/NNX/Equinox/``jnp``
model runs on the chip unmodified::

    w = chip.weights(t)                        # PCMWeights: the weight model at time t
    noisy_fn = noisejax.noisy(model.apply, weight=w, neuron=chip, sites="matmuls")
    pred = noisejax.analytic(model.apply, weight=w, neuron=chip, sites="matmuls")(variables, x)

* **Weights** (:class:`PCMWeights`, ``weight=``): every selected leaf, seen as the matrix
  ``(fan_in, fan_out) = (prod(shape[:-1]), shape[-1])`` (a Dense kernel, a convolution kernel
  ``(*window, in, out)``), is programmed onto PCM tiles, read ``t`` seconds later and — with
  ``compensation`` — multiplied by its per-tile drift-compensation gain.  Sampling draws one
  programming per realization (keys below); the moments are the exact per-weight mean and
  variance of :meth:`PCMNoise.weight_moments` with the gain of the expected readouts.  The gain
  is folded into the weights (right for every digital use of the leaf) and reported to the
  interpreter as the leaf's output gain, which the crossbar moves back behind its ADC.
* **Products** (``neuron=chip`` at ``sites="matmuls"``): a product model of
  :mod:`noisejax.interpret` — a ``dot_general`` whose one operand is a parameter (the crossbar's
  weights) runs through :meth:`AnalogMVM.tiled` (DAC, output noise, ADC, noise and bound
  management, per-tile gains after the ADC); a convolution runs the same on its patches
  (im2col, one crossbar row per patch).  Its moment rule is the product's own rule
  (:mod:`noisejax.rules`, weight noise included) plus the periphery as uniform/Gaussian noise
  (below).  Products of two activations (attention) stay digital.

Moment rule of a crossbar (``m_k = max|E x_k|`` per row and input tile ``k``, the
bound-management reduction ``r_ko`` — the smallest power of two with
``max|E z| <= r·out_bound`` — from the means, gain ``α_ko``)::

    E y   = Σ_k α_ko · DAC(E x_k) W_ko            (noise-free input: the quantized mean)
          = E x · E W'                             (noisy input)
    Var y += Σ_k (α_ko m_k r_ko)² (σ_out² + δ_out²/12)               output noise + ADC
    DAC    : uniform noise of variance (δ_in m_k max_o r_ko)²/12 on each input entry of a
             noisy input (through the product: covariances exact for Dense products; for
             convolutions per output, the cross-channel covariance of this term dropped)

Validity (as :func:`noisejax.hardware.drift_moments`): no ADC clipping after bound
management, pre-ADC noise of at least half an ADC step, a noisy input's spread of at least
half a DAC step; ``m`` and ``r`` are taken at the mean; the gain's fluctuation over
realizations (``O(1/√(in·out))``) is neglected.

Keys of :meth:`PCMWeights.apply_with_gains` (``key``: the weight key the interpreter gives):
selected leaf ``j`` (its flattening index) programs with ``fold_in(fold_in(key, j), 0)`` and
reads its baseline with ``fold_in(·, 1)``; it is read with ``fold_in(fold_in(kj, 2), b(t))``
and its readout at ``t`` uses ``fold_in(fold_in(kj, 3), b(t))``, ``b(t)`` the bits of
``float32(t)`` — so the programming is shared by every time of a realization (``vmap`` over
``t`` with one key) and each time reads afresh.  The crossbar's output noise of example
``e`` at site ``s`` uses the site key ``fold_in(·, e)`` (:mod:`noisejax.interpret`).

Example::

    >>> chip = hw.AnalogHardware()                           # PCM + aihwkit 1.1.0 periphery
    >>> nf = noisejax.noisy(model.apply, weight=chip.weights(86400.0), neuron=chip, sites="matmuls")
    >>> y = nf(jax.random.key(0), variables, x)              # one programming, read after a day
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from noisejax import _struct as struct
from jax import lax

from noisejax import _validate
from noisejax import gaussian as G
from noisejax import rules as R
from noisejax.errors import InvalidArgumentError
from noisejax.hardware.compensation import compensation_readout
from noisejax.hardware.mvm import AnalogMVM
from noisejax.hardware.pcm import PCMMoments, PCMNoise, _folded_normal_mean
from noisejax.hardware.tiles import DEFAULT_TILE, TileGrid, check_tile
from noisejax.noise import default_leaf_filter

__all__ = ["COMPENSATIONS", "AnalogHardware", "PCMWeights", "crossbar_leaves"]

Array = jax.Array
PyTree = Any
#: drift compensation: through the (noisy) periphery as aihwkit, exact readout, or none
COMPENSATIONS: tuple[str, ...] = ("readout", "exact", "none")


def crossbar_leaves(path: tuple, leaf: Any) -> bool:
    """The default leaves on crossbars: floating-point matrices and kernels (``ndim >= 2``),
    normalization parameters and statistics excluded (:func:`noisejax.noise.default_leaf_filter`)."""
    return default_leaf_filter(path, leaf) and getattr(leaf, "ndim", 0) >= 2


# ----------------------------------------------------------------------------------
# The chip
# ----------------------------------------------------------------------------------


@struct.dataclass
class AnalogHardware:
    """The analog hardware a network runs on: devices, periphery, mapping, compensation.

    A product model for :func:`noisejax.noisy`/:func:`noisejax.analytic` at matmul sites (module
    doc), the ``noise`` of :func:`AnalogDense` layers (other sites ignore it), and the source of
    the weight model :meth:`weights`.

    Attributes:
      pcm: the device model (:class:`~noisejax.hardware.pcm.PCMNoise`).
      mvm: the periphery (:class:`~noisejax.hardware.mvm.AnalogMVM`); ``None`` computes
        the products exactly (devices only).
      compensation: static; ``"readout"`` (aihwkit's global drift compensation, read out
        through ``mvm``), ``"exact"`` (noise-free readouts) or ``"none"``.
      tile: static; crossbar size ``(max_in, max_out)`` (aihwkit: 512 × 512), ``None``: one
        crossbar per layer.
    """

    pcm: PCMNoise = struct.field(default_factory=PCMNoise)
    mvm: Optional[AnalogMVM] = struct.field(default_factory=AnalogMVM)
    compensation: str = struct.field(pytree_node=False, default="readout")
    tile: Optional[tuple[int, int]] = struct.field(pytree_node=False, default=DEFAULT_TILE)

    def __post_init__(self):
        if isinstance(self.compensation, str):
            _validate.check_choice("AnalogHardware.compensation", self.compensation, COMPENSATIONS)
        if isinstance(self.tile, (tuple, list)) or self.tile is None:
            object.__setattr__(self, "tile", check_tile(self.tile, "AnalogHardware.tile"))
        if not isinstance(self.pcm, PCMNoise):
            raise InvalidArgumentError(f"AnalogHardware.pcm must be a PCMNoise, got {type(self.pcm).__name__}")
        if self.mvm is not None and not isinstance(self.mvm, AnalogMVM):
            raise InvalidArgumentError(f"AnalogHardware.mvm must be an AnalogMVM or None, got {type(self.mvm).__name__}")

    def weights(self, t: Array, *, nodes: int = 24, leaf_filter: Callable = crossbar_leaves) -> "PCMWeights":
        """The weight model of this chip ``t`` seconds after programming (:class:`PCMWeights`)."""
        return PCMWeights(self, t, nodes=nodes, leaf_filter=leaf_filter)

    def product(self, x: Array, W: Array, *, key: Array, gain: Optional[Array] = None) -> Array:
        """``x @ W`` (rows ``(..., in)``, ``W (in, out)``) on the crossbars; ``gain`` per tile after the ADC."""
        if self.mvm is None:
            grid = TileGrid.of(W.shape, self.tile)
            return x @ (W if gain is None else W * grid.expand(jnp.broadcast_to(gain, grid.shape)).astype(W.dtype))
        return self.mvm.tiled(x, W, key=key, tile=self.tile, gain=gain)

    # ------------------------------------------------------------------ product model

    def sample_site(self, op, ins, *, key, batch_axes, gains, params):
        """The sampling rule at a matmul site (:mod:`noisejax.interpret`): the crossbar computes the op."""
        w_pos = _weight_position(params, len(ins))
        if self.mvm is None or w_pos is None:
            return [op.prim.bind(*ins, **op.params)]
        x, W = ins[1 - w_pos], ins[w_pos]
        view = _view(op, w_pos, jnp.ndim(x), jnp.ndim(W), W.shape)
        xc, Wc = view.rows(x), view.matrix(W)
        gain = _check_gain(gains[w_pos], Wc.shape, self.tile, view)
        if gain is not None:
            Wc = Wc / _expand(gain, Wc.shape, self.tile).astype(Wc.dtype)
        nb = min(int(batch_axes), xc.ndim - 1)
        lead = xc.shape[:nb]
        n_ex = int(np.prod(lead)) if lead else 1
        xe = xc.reshape((n_ex,) + xc.shape[nb:])
        keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(n_ex))
        y = jax.vmap(lambda v, k: self.product(v, Wc, key=k, gain=gain))(xe, keys)
        return [view.output(y.reshape(lead + y.shape[1:]))]

    def site_moments(self, ctx, op, ins, *, gains):
        """The moment rule at a matmul site: the product's rule plus the periphery (module doc)."""
        w_pos = _weight_position(ctx.params, len(ins))
        if self.mvm is None or w_pos is None:
            return R.apply_rule(ctx, op, ins)
        x, w = ins[1 - w_pos], ins[w_pos]
        xm, wm = G.as_gaussian(x).mean, G.as_gaussian(w).mean
        view = _view(op, w_pos, xm.ndim, wm.ndim, wm.shape)
        Wm = view.matrix(wm)
        gain = _check_gain(gains[w_pos], Wm.shape, self.tile, view)
        grid = TileGrid.of(Wm.shape, self.tile)
        dtype = xm.dtype
        alpha = jnp.ones(grid.shape, dtype) if gain is None else jnp.broadcast_to(jnp.asarray(gain, dtype), grid.shape)
        Wt = Wm / grid.expand(alpha).astype(Wm.dtype)  # the devices' weights (the gain acts after the ADC)
        rows = view.rows(xm)
        m, r = _management(self.mvm, rows, Wt, grid)
        out_var = _periphery_variance(self.mvm, m, r, alpha, grid, rows.shape[:-1])
        noisy_x = isinstance(x, G.Gaussian) and bool(x.blocks)
        if view.kind == "dot":
            y = self._dot_moments(ctx, op, view, x, w, rows, Wm, grid, m, r, noisy_x)
        else:
            y = self._conv_moments(ctx, op, view, x, w, rows, Wm, grid, m, r, noisy_x)
        periphery = G.Diag(G.fresh(), G._safe_sqrt(view.output(out_var)))
        return [G.Gaussian(y.mean, y.blocks + (periphery,))]

    def _dot_moments(self, ctx, op, view, x, w, rows, Wm, grid, m, r, noisy_x):
        mvm = self.mvm
        dtype = rows.dtype
        r_max = [_max_over(r, k, grid.shape[1]) for k in range(grid.shape[0])]
        if noisy_x:  # the DAC as uniform noise on each input entry, shared by the output tiles
            std = jnp.concatenate([
                jnp.sqrt(jnp.square(mvm.inp_step.astype(dtype)) / 12.0) * m[k] * r_max[k] * jnp.ones(rows[..., si].shape, dtype)
                for k, si in enumerate(grid.in_slices())
            ], axis=-1)
            xr = view.rows_state(ctx, x)
            x_eff = G.Gaussian(xr.mean, xr.blocks + (G.Diag(G.fresh(), std),))
            mean = None
        else:  # a noise-free input: the quantized mean, exactly
            x_eff = jnp.concatenate([mvm.dac(rows[..., si] / (m[k] * r_max[k])) * (m[k] * r_max[k])
                                     for k, si in enumerate(grid.in_slices())], axis=-1)
            mean = _quantized_mean(mvm, rows, Wm, grid, m, r)
        y = _canonical_product(ctx, op, x_eff, view.matrix_state(ctx, w))
        if mean is not None:
            y = G.Gaussian(mean, y.blocks)
        return view.output_state(ctx, y)

    def _conv_moments(self, ctx, op, view, x, w, rows, Wm, grid, m, r, noisy_x):
        mvm = self.mvm
        dtype = rows.dtype
        if noisy_x:  # the convolution's own rule; the DAC per patch entry, per output (module doc)
            y = G.as_gaussian(R.apply_rule(ctx, op, [x, w])[0])
            second = jnp.square(Wm) + view.matrix(G.variance(G.as_gaussian(w)))  # E W'² per entry
            unit = jnp.square(mvm.inp_step.astype(dtype)) / 12.0
            dac = 0.0
            for k, si in enumerate(grid.in_slices()):
                dac = dac + unit * jnp.square(m[k] * _max_over(r, k, grid.shape[1])) * jnp.sum(second[si], axis=0)
            return G.Gaussian(y.mean, y.blocks + (G.Diag(G.fresh(), G._safe_sqrt(view.output(dac))),))
        r_max = [_max_over(r, k, grid.shape[1]) for k in range(grid.shape[0])]
        x_eff = jnp.concatenate([mvm.dac(rows[..., si] / (m[k] * r_max[k])) * (m[k] * r_max[k])
                                 for k, si in enumerate(grid.in_slices())], axis=-1)
        y = _canonical_product(ctx, op, x_eff, view.matrix_state(ctx, w))
        y = G.Gaussian(_quantized_mean(mvm, rows, Wm, grid, m, r), y.blocks)
        return view.output_state(ctx, y)


# ----------------------------------------------------------------------------------
# The weight model
# ----------------------------------------------------------------------------------


@struct.dataclass
class PCMWeights:
    """The chip's PCM devices as a weight model ``t`` seconds after programming.

    The ``weight=`` of :func:`noisejax.noisy` / :func:`noisejax.analytic` (and of
    :func:`noisejax.moments.predict`); see the module doc for what a leaf becomes and the keys.

    Attributes:
      hardware: the :class:`AnalogHardware` (devices, tiles, compensation, readout periphery).
      t: seconds after programming (a leaf: ``vmap`` over times).
      nodes: static; Gauss–Legendre points per device of :meth:`PCMNoise.weight_moments`.
      leaf_filter: static; ``(path, leaf) -> bool``, the leaves on crossbars
        (default :func:`crossbar_leaves`).
    """

    hardware: AnalogHardware = struct.field(default_factory=AnalogHardware)
    t: Array = 1.0
    nodes: int = struct.field(pytree_node=False, default=24)
    leaf_filter: Callable = struct.field(pytree_node=False, default=crossbar_leaves)

    def __post_init__(self):
        if not isinstance(self.hardware, AnalogHardware):
            raise InvalidArgumentError(f"PCMWeights.hardware must be an AnalogHardware, got {type(self.hardware).__name__}")
        _validate.check_real_number("PCMWeights.t", self.t)
        if _validate._is_concrete(self.t):
            if np.any(np.asarray(self.t) < 0):
                raise InvalidArgumentError(f"PCMWeights.t must be >= 0 seconds after programming, got {np.asarray(self.t).tolist()}")
            object.__setattr__(self, "t", jnp.asarray(self.t, jnp.result_type(float)))
        if isinstance(self.nodes, (int, np.integer)):
            object.__setattr__(self, "nodes", _validate.check_int("PCMWeights.nodes", self.nodes, minimum=2))

    def _leaves(self, params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        return [(path, leaf, bool(self.leaf_filter(path, leaf))) for path, leaf in flat], treedef

    def apply_with_gains(self, params: PyTree, *, key: Array) -> tuple[PyTree, PyTree]:
        """One realization: ``(params with every selected leaf programmed, read at t and compensated,
        gains)``; ``gains`` has ``params``' structure with the ``(Ti, To)`` gain per selected leaf
        (``None`` elsewhere, and everywhere with ``compensation="none"``)."""
        hw = self.hardware
        leaves, treedef = self._leaves(params)
        tbits = lax.bitcast_convert_type(jnp.asarray(self.t, jnp.float32), jnp.uint32)
        out, gains = [], []
        for j, (_, leaf, chosen) in enumerate(leaves):
            if not chosen:
                out.append(leaf)
                gains.append(None)
                continue
            kj = jax.random.fold_in(key, j)
            K = _as_matrix(leaf)
            grid = TileGrid.of(K.shape, hw.tile)
            state = hw.pcm.program(K, key=jax.random.fold_in(kj, 0), tile=hw.tile)
            W_t = hw.pcm.read(state, jnp.asarray(self.t, K.dtype), key=jax.random.fold_in(jax.random.fold_in(kj, 2), tbits))
            gain = None
            if hw.compensation != "none":
                mvm = hw.mvm if hw.compensation == "readout" else None
                base = compensation_readout(state.weights, mvm=mvm, key=jax.random.fold_in(kj, 1), tile=hw.tile)
                now = compensation_readout(W_t, mvm=mvm, key=jax.random.fold_in(jax.random.fold_in(kj, 3), tbits), tile=hw.tile)
                gain = jnp.reshape(base / now, grid.shape)
                W_t = W_t * grid.expand(gain)
            out.append(W_t.reshape(leaf.shape).astype(leaf.dtype))
            gains.append(gain)
        return jax.tree_util.tree_unflatten(treedef, out), jax.tree_util.tree_unflatten(treedef, gains)

    def apply(self, params: PyTree, *, key: Array) -> PyTree:
        """One realization of the weights (the compensation folded in); see :meth:`apply_with_gains`."""
        return self.apply_with_gains(params, key=key)[0]

    def weight_moments_with_gains(self, params: PyTree) -> tuple[PyTree, PyTree, PyTree]:
        """``(mean, variance, gains)`` per leaf: the exact statistics of :meth:`PCMNoise.weight_moments`
        times the analytic gain ``α`` (ratio of the expected readouts; ``"readout"`` uses a
        folded-normal model of the noisy readout): mean ``α E W_t``, variance ``α² Var W_t``."""
        hw = self.hardware
        leaves, treedef = self._leaves(params)
        means, variances, gains = [], [], []
        for _, leaf, chosen in leaves:
            if not chosen:
                means.append(leaf)
                variances.append(None)
                gains.append(None)
                continue
            K = _as_matrix(leaf)
            grid = TileGrid.of(K.shape, hw.tile)
            st = hw.pcm.weight_moments(K, self.t, tile=hw.tile, nodes=self.nodes)
            gain = _analytic_gain(hw, st, grid)
            A = 1.0 if gain is None else grid.expand(gain).astype(st.mean.dtype)
            means.append((st.mean * A).reshape(leaf.shape).astype(leaf.dtype))
            variances.append((st.var * jnp.square(A)).reshape(leaf.shape).astype(leaf.dtype))
            gains.append(gain)
        unflat = lambda v: jax.tree_util.tree_unflatten(treedef, v)  # noqa: E731
        return unflat(means), unflat(variances), unflat(gains)

    def weight_moments(self, params: PyTree) -> tuple[PyTree, PyTree]:
        """``(mean, variance)`` per leaf (:meth:`weight_moments_with_gains` without the gains)."""
        return self.weight_moments_with_gains(params)[:2]


def _as_matrix(leaf: Array) -> Array:
    leaf = jnp.asarray(leaf)
    if leaf.ndim < 2:
        raise InvalidArgumentError(f"a leaf on crossbars must have >= 2 dimensions (fan_in..., fan_out), got shape {tuple(leaf.shape)}")
    return leaf.reshape(-1, leaf.shape[-1])


def _analytic_gain(hw: AnalogHardware, st: PCMMoments, grid: TileGrid) -> Optional[Array]:
    """Drift-compensation gain per tile from the exact weight statistics (ratio of expectations)."""
    if hw.compensation == "none":
        return None
    if hw.compensation == "exact" or hw.mvm is None:
        ref, now = st.prog_abs_mean, st.abs_mean
    else:
        mvm = hw.mvm
        c = mvm.dac(jnp.ones((), st.mean.dtype))  # the one-hot input after the DAC
        noise = jnp.square(mvm.out_noise) + jnp.square(mvm.out_step) / 12.0
        ref = _folded_normal_mean(c * st.prog_mean, c * c * st.prog_var + noise)
        now = _folded_normal_mean(c * st.mean, c * c * st.var + noise)
    floor = 1e-4
    return jnp.maximum(grid.reduce(jnp.mean, ref), floor) / jnp.maximum(grid.reduce(jnp.mean, now), floor)


# ----------------------------------------------------------------------------------
# Products as crossbar operations: rows (..., in) times a matrix (in, out)
# ----------------------------------------------------------------------------------


def _weight_position(params, n_ins: int) -> Optional[int]:
    """The operand holding the crossbar's weights: the parameter one (the right-hand one if both)."""
    flags = tuple(params) + (False,) * (n_ins - len(params))
    if n_ins != 2 or not any(flags[:2]):
        return None
    return 1 if flags[1] else 0


@dataclasses.dataclass(frozen=True)
class _View:
    """How an op's operands become crossbar rows ``(..., in)`` and a matrix ``(in, out)``, and back."""

    kind: str  # "dot" | "conv"
    x_perm: tuple  # dot: permutation of x putting its contracting axis last; conv: of the patches
    w_perm: tuple  # permutation of W putting the output axis last (rows: the other axes in order)
    w_shape: tuple
    out_perm: tuple  # permutation of the canonical output (..., out) into the op's output
    transposed: bool  # the matrix is the leaf's transpose (its tiles differ from the weight model's)
    conv: Optional[dict] = None  # patches arguments
    feature_order: Optional[np.ndarray] = None  # conv: patch features -> matrix rows

    def rows(self, x: Array) -> Array:
        if self.kind == "dot":
            return jnp.transpose(x, self.x_perm)
        c = self.conv
        p = lax.conv_general_dilated_patches(x, c["window"], c["strides"], c["padding"], c["lhs_dilation"], c["rhs_dilation"],
                                             c["dn"], c["precision"])
        return jnp.take(jnp.transpose(p, self.x_perm), self.feature_order, axis=-1)

    def matrix(self, W: Array) -> Array:
        W = jnp.transpose(W, self.w_perm)
        return W.reshape(-1, W.shape[-1])

    def output(self, y: Array) -> Array:
        return jnp.transpose(y, self.out_perm)

    def rows_state(self, ctx, x):
        return _layout(ctx, x, self.rows)

    def matrix_state(self, ctx, w):
        return _layout(ctx, w, self.matrix)

    def output_state(self, ctx, y):
        return _layout(ctx, y, self.output)


def _layout(ctx, g, f):
    if not isinstance(g, G.Gaussian):
        return f(g)
    return G.map_linear(g, f, f(g.mean), mode=ctx.mode, layout=(f, f))


def _view(op, w_pos: int, x_ndim: int, w_ndim: int, w_shape) -> _View:
    name = op.prim.name
    if name == "dot_general":
        (lc, rc), (lb, rb) = op.params["dimension_numbers"]
        cx, cw = (tuple(lc), tuple(rc)) if w_pos == 1 else (tuple(rc), tuple(lc))
        if lb or rb or w_ndim != 2 or len(cx) != 1 or len(cw) != 1:
            raise InvalidArgumentError(
                f"AnalogHardware: a crossbar computes rows (..., in) times a matrix (in, out); the product at {op.source} "
                f"contracts {cw} of a {w_ndim}-D weight with batch dimensions {tuple(lb) or tuple(rb) or '()'}"
            )
        x_free = [d for d in range(x_ndim) if d != cx[0]]
        x_perm = tuple(x_free) + cx
        w_perm = (cw[0], 1 - cw[0])
        n_free = len(x_free)
        # the op's output: (x free..., w free) if x is the lhs, else (w free, x free...)
        out_perm = tuple(range(n_free + 1)) if w_pos == 1 else (n_free,) + tuple(range(n_free))
        return _View("dot", x_perm, w_perm, tuple(w_shape), out_perm, cw[0] == 1)
    if name == "conv_general_dilated":
        p = op.params
        if w_pos != 1 or p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
            raise InvalidArgumentError(
                f"AnalogHardware: the convolution at {op.source} has feature/batch groups; a crossbar maps one kernel "
                "(grouped convolutions are not supported)"
            )
        dn = p["dimension_numbers"]
        rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
        window = tuple(w_shape[d] for d in rhs_spec[2:])
        o_dim = rhs_spec[0]
        w_perm = tuple(d for d in range(w_ndim) if d != o_dim) + (o_dim,)
        # patch features are ordered (in, *window in rhs_spec order); matrix rows are the kernel's own axis order
        idx = np.arange(int(np.prod([w_shape[d] for d in w_perm[:-1]]))).reshape([w_shape[d] for d in w_perm[:-1]])
        rest = list(w_perm[:-1])
        patch_axes = [rest.index(d) for d in (rhs_spec[1],) + tuple(rhs_spec[2:])]
        row_of_feature = np.transpose(idx, patch_axes).reshape(-1)
        feature_order = np.argsort(row_of_feature)
        x_perm = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
        out_perm = tuple(np.argsort(x_perm))
        conv = {"window": window, "strides": p["window_strides"], "padding": p["padding"], "lhs_dilation": p["lhs_dilation"],
                "rhs_dilation": p["rhs_dilation"], "dn": dn, "precision": R.patch_precision(p.get("precision"))}
        return _View("conv", x_perm, w_perm, tuple(w_shape), out_perm, tuple(w_perm) != tuple(range(w_ndim)), conv,
                     feature_order)
    raise InvalidArgumentError(f"AnalogHardware computes dot_general and conv_general_dilated sites, not {name} at {op.source}")


def _expand(gain, shape, tile):
    grid = TileGrid.of(shape, tile)
    return grid.expand(jnp.broadcast_to(gain, grid.shape))


def _check_gain(gain, shape, tile, view: _View):
    if gain is None:
        return None
    gain = jnp.asarray(gain)
    grid = TileGrid.of(shape, tile)
    if gain.shape not in ((), grid.shape) or (view.transposed and grid.shape != (1, 1)):
        raise InvalidArgumentError(
            f"AnalogHardware: the weight model's gain of shape {tuple(gain.shape)} does not match the {grid.shape} tiles "
            f"of the {shape[0]} x {shape[1]} crossbar matrix (a leaf is mapped as (prod(shape[:-1]), shape[-1]); "
            "this product uses it in another orientation)"
        )
    return jnp.broadcast_to(gain, grid.shape)


def _management(mvm: AnalogMVM, rows: Array, Wt: Array, grid: TileGrid) -> tuple[list, dict]:
    """Noise management ``m_k`` and bound management ``r_ko`` of each row, from the means (``(..., 1)``)."""
    dtype = rows.dtype
    ob = jnp.asarray(mvm.out_bound, dtype)
    n_max = jnp.floor(jnp.log2(mvm.bm_limit())) + 1.0  # r never exceeds 2^n_max (first power of two past the limit)
    m = []
    for si in grid.in_slices():
        mk = jnp.max(jnp.abs(rows[..., si]), axis=-1, keepdims=True) if mvm.noise_management == "abs_max" else \
            jnp.ones(rows.shape[:-1] + (1,), dtype)
        m.append(jnp.where(mk > 0, mk, 1.0))
    r = {}
    for k, si in enumerate(grid.in_slices()):
        for o, so in enumerate(grid.out_slices()):
            if mvm.bound_management == "iterative":
                zmax = jnp.max(jnp.abs((rows[..., si] / m[k]) @ Wt[si, so]), axis=-1, keepdims=True)
                n = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(zmax / ob, 1e-30))), 0.0, n_max)
                r[k, o] = jnp.power(2.0, n).astype(dtype)
            else:
                r[k, o] = jnp.ones_like(m[k])
    return m, r


def _max_over(r: dict, k: int, n_out_tiles: int) -> Array:
    out = r[k, 0]
    for o in range(1, n_out_tiles):
        out = jnp.maximum(out, r[k, o])
    return out


def _periphery_variance(mvm: AnalogMVM, m, r, alpha, grid: TileGrid, lead) -> Array:
    """Output noise + ADC per output: ``Σ_k (α_ko m_k r_ko)² (σ_out² + δ_out²/12)``, shape ``(*lead, out)``."""
    dtype = alpha.dtype
    unit = jnp.square(jnp.asarray(mvm.out_noise, dtype)) + jnp.square(mvm.out_step.astype(dtype)) / 12.0
    cols = []
    for o, so in enumerate(grid.out_slices()):
        v = sum(jnp.square(alpha[k, o] * m[k] * r[k, o]) for k in range(grid.shape[0])) * unit
        cols.append(jnp.broadcast_to(v, tuple(lead) + (so.stop - so.start,)))
    return jnp.concatenate(cols, axis=-1)


def _quantized_mean(mvm: AnalogMVM, rows, Wm, grid: TileGrid, m, r) -> Array:
    """``Σ_k DAC(x_k / s_ko) s_ko · W'_ko`` per output tile (``W'``: the gain folded in), ``(..., out)``."""
    cols = []
    for o, so in enumerate(grid.out_slices()):
        acc = 0.0
        for k, si in enumerate(grid.in_slices()):
            s = m[k] * r[k, o]
            acc = acc + (mvm.dac(rows[..., si] / s) * s) @ Wm[si, so]
        cols.append(acc)
    return jnp.concatenate(cols, axis=-1)


def _canonical_product(ctx, op, x, w):
    """``x (..., in) @ w (in, out)`` through the ``dot_general`` rule (weight noise included)."""
    xm = G.as_gaussian(x).mean
    wm = G.as_gaussian(w).mean
    params = {"dimension_numbers": (((xm.ndim - 1,), (0,)), ((), ())), "precision": op.params.get("precision"),
              "preferred_element_type": op.params.get("preferred_element_type")}
    for extra in ("out_sharding",):
        if extra in op.params:
            params[extra] = None
    out = jax.eval_shape(lambda a, b: lax.dot_general_p.bind(a, b, **params),
                         jax.ShapeDtypeStruct(xm.shape, xm.dtype), jax.ShapeDtypeStruct(wm.shape, wm.dtype))
    sub = dataclasses.replace(op, prim=lax.dot_general_p, params=params, out_avals=(jax.core.ShapedArray(out.shape, out.dtype),))
    saved = ctx.params
    ctx.params = (False, True)
    try:
        y = R.apply_rule(ctx, sub, [x, w])[0]
    finally:
        ctx.params = saved
    return G.as_gaussian(y)
