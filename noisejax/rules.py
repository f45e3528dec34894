"""Moment rules: one per primitive, mapping the Gaussian states of an op's inputs to its outputs.

The analytic interpretation of :mod:`noisejax.interpret` walks a program op by
op; for an op whose inputs carry noise (:class:`noisejax.gaussian.Gaussian`
states) it calls ``RULES[primitive](ctx, op, ins) -> outs``.  Ops without noisy
inputs are simply evaluated.  What each family does (``m`` mean, ``L`` loadings
on latent sources, see :mod:`noisejax.gaussian`):

* **Linear** (exact): ``add``, ``sub``, ``neg``, multiplication/division by a
  constant, ``select_n`` with a noise-free predicate, ``convert_element_type``,
  layout (``reshape``, ``transpose``, ``slice``, ``pad``, ``concatenate``,
  ``broadcast_in_dim``, ``squeeze``, ``expand_dims``, ``rev``, ``gather``,
  ``dynamic_slice``), sums (``reduce_sum``, ``reduce_window_sum`` — average
  pooling —, ``cumsum``), ``dot_general`` and ``conv_general_dilated`` with a
  noise-free operand: ``m' = A m (+ b)``, ``L' = A L``.  Diagonal blocks stay
  diagonal through elementwise and layout maps.
* **Weight noise** (exact in its mean part): ``dot_general``/``conv`` whose
  kernel carries independent noise of variance ``σ²`` per entry adds, per output
  channel ``o``, the covariance ``σ²_o · X Xᵀ`` over the positions (or tokens)
  that share the kernel (``X``: the mean input patches) — kept as columns, so
  a convolution followed by pooling is exact — plus the diagonal
  ``Σ σ² Var x`` (the second-order term's cross-position part is dropped).
* **Activations and other elementwise nonlinearities** ``y = f(x)``: Gaussian
  moment matching (:func:`noisejax.quadrature.activation_moments`: closed forms
  for ReLU, erf, exp, x², quadrature otherwise) with Stein's gain
  ``E f'(x)`` on the loadings and the non-Gaussian residue as new independent
  noise; functions not defined on the whole real line (``log``, ``sqrt``,
  ``rsqrt``, division by a noisy value...) are linearized (first order).
* **Products of two noisy values** (``mul``; ``dot_general`` of two
  activations, e.g. attention's ``q kᵀ``): first-order loadings
  ``m_b L_a + m_a L_b``; the mean gains ``Cov(a, b)``; the residue
  ``Var a Var b + Cov(a, b)²`` (exact for jointly Gaussian factors of ``mul``;
  ``Σ_j Var a_j Var b_j`` for a contraction) is new independent noise.
* **Maxima** (``max``/``min`` of two noisy values, ``reduce_window_max`` — max
  pooling —, ``reduce_max``): Clark's Gaussian approximation of the max, applied
  pairwise, with gains ``Φ(α)``, ``Φ(−α)``.
* ``stop_gradient`` of a max used to shift a softmax is noise-free (the softmax
  does not depend on the shift); integer and boolean results (comparisons,
  ``argmax``) are computed on the means.

Anything else with a noisy input raises :class:`UnsupportedPrimitiveError`
(unless ``unknown="linearize"``: first order through ``jax.jvp``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from noisejax import gaussian as G
from noisejax import quadrature as Q
from noisejax._jaxpr import _PARTIAL
from noisejax.errors import InvalidArgumentError

__all__ = ["UnsupportedPrimitiveError", "Context", "RULES", "activation_state", "apply_rule"]

Array = jax.Array
Gaussian = G.Gaussian


class UnsupportedPrimitiveError(InvalidArgumentError, NotImplementedError):
    """The analytic interpretation has no moment rule for a primitive whose input is noisy."""


@dataclasses.dataclass
class Context:
    """Options of one analytic interpretation, and the op being interpreted."""

    mode: str = "factored"  # "factored" | "lowrank" ("full" is factored)
    method: str = "gaussian"  # "gaussian" | "linearized"
    quad_nodes: int = 64
    unknown: str = "error"  # "error" | "linearize"
    live: frozenset = frozenset()  # sids other live values carry
    op: Any = None
    params: tuple = ()  # per input of the op: is it a (noisy) parameter rather than data
    noise_free_stop_gradient: bool = False  # set per op by the interpreter (softmax shifts)


def _is_g(x) -> bool:
    return isinstance(x, Gaussian)


def _mean(x):
    return x.mean if isinstance(x, Gaussian) else x


def _bind(op, args):
    out = op.prim.bind(*args, **op.params)
    return list(out) if op.prim.multiple_results else [out]


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


RULES: dict[str, Callable] = {}


def _rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def apply_rule(ctx: Context, op, ins: list) -> list:
    """The outputs of ``op`` for inputs ``ins`` (arrays or Gaussian states)."""
    if not any(_is_g(x) for x in ins):
        return _bind(op, ins)
    means_out = None
    if all(not jnp.issubdtype(a.dtype, jnp.inexact) for a in op.out_avals):
        # integer / boolean results (comparisons, argmax, shapes): computed on the means
        return _bind(op, [_mean(x) for x in ins])
    rule = RULES.get(op.prim.name)
    if rule is None:
        return _fallback(ctx, op, ins, f"no moment rule for primitive '{op.prim.name}' with a noisy input")
    del means_out
    return rule(ctx, op, ins)


# ----------------------------------------------------------------------------------
# Broadcasting and elementwise linear maps
# ----------------------------------------------------------------------------------


def _broadcast(ctx: Context, x, shape) -> Any:
    """A state (or array) broadcast to ``shape`` the way lax's binary ops do (size-1 dims, scalars)."""
    if not _is_g(x):
        return jnp.broadcast_to(x, shape)
    if x.shape == tuple(shape):
        return x
    nd = len(shape)
    dims = tuple(range(nd)) if x.mean.ndim == nd else tuple(range(nd - x.mean.ndim, nd))
    f = lambda a: lax.broadcast_in_dim(a, tuple(shape), dims)  # noqa: E731
    return G.map_linear(x, f, f(x.mean), mode=ctx.mode, layout=(f, f), lin_sq=f)


@_rule("add", "sub", "add_any")
def _add_rule(ctx, op, ins):
    mean = _bind(op, [_mean(x) for x in ins])[0]
    out = None
    for i, x in enumerate(ins):
        if not _is_g(x):
            continue
        g = _broadcast(ctx, x, mean.shape)
        if op.prim.name == "sub" and i == 1:
            g = G.scale(g, -1.0)
        out = g if out is None else G.add(out, g)
    return [G.Gaussian(mean, G.merge(out.blocks, mean.shape))]


@_rule("neg")
def _neg_rule(ctx, op, ins):
    return [G.scale(ins[0], -1.0)]


@_rule("mul")
def _mul_rule(ctx, op, ins):
    a, b = ins
    if _is_g(a) and _is_g(b):
        return [_product(ctx, a, b)]
    g, c = (a, b) if _is_g(a) else (b, a)
    mean = _bind(op, [_mean(a), _mean(b)])[0]
    return [G.scale(_broadcast(ctx, g, mean.shape), jnp.broadcast_to(c, mean.shape), mean=mean)]


@_rule("div")
def _div_rule(ctx, op, ins):
    a, b = ins
    if _is_g(b):
        return _elementwise_nonlinear(ctx, op, ins)
    mean = _bind(op, [a.mean, b])[0]
    return [G.scale(_broadcast(ctx, a, mean.shape), 1.0 / jnp.broadcast_to(jnp.asarray(b, mean.dtype), mean.shape), mean=mean)]


@_rule("convert_element_type")
def _convert_rule(ctx, op, ins):
    (x,) = ins
    dtype = op.params["new_dtype"]
    g = x
    return [G.Gaussian(x.mean.astype(dtype), tuple(_cast_block(b, dtype) for b in g.blocks))]


def _cast_block(b, dtype):
    if isinstance(b, G.Diag):
        return G.Diag(b.sid, b.scale.astype(dtype), b.src, b.n)
    if isinstance(b, G.Dense):
        return G.Dense(b.sid, b.cols.astype(dtype))
    if isinstance(b, G.Channel):
        return G.Channel(b.sid, b.u.astype(dtype), b.axis)
    return G.Lazy(b.sid, b.left.astype(dtype), b.a.astype(dtype), b.right.astype(dtype))


@_rule("copy", "copy_p", "reduce_precision", "noisejax_site", "pvary")
def _identity_rule(ctx, op, ins):
    return list(ins)


@_rule("optimization_barrier")
def _barrier_rule(ctx, op, ins):
    return list(ins)


@_rule("stop_gradient")
def _stop_gradient_rule(ctx, op, ins):
    (x,) = ins
    return [x.mean if ctx.noise_free_stop_gradient else x]


@_rule("select_n")
def _select_rule(ctx, op, ins):
    pred, *cases = ins
    if _is_g(pred):
        pred = pred.mean
    mean = _bind(op, [pred] + [_mean(c) for c in cases])[0]
    shape = mean.shape
    out = None
    for i, c in enumerate(cases):
        if not _is_g(c):
            continue
        if pred.dtype == jnp.bool_:
            mask = jnp.broadcast_to(pred if i == 1 else ~pred, shape)
        else:
            mask = jnp.broadcast_to(pred == i, shape)
        g = G.scale(_broadcast(ctx, c, shape), mask.astype(mean.dtype))
        out = g if out is None else G.add(out, g)
    return [G.Gaussian(mean, out.blocks)]


# ----------------------------------------------------------------------------------
# Structural linear maps (layout and mixing)
# ----------------------------------------------------------------------------------


def _structural(
    linear: tuple,
    *,
    layout: bool,
    zero: tuple = (),
    lin_sq: Optional[Callable] = None,
    product: bool = False,
    many_to_one: Optional[Callable] = None,
    reshape: bool = False,
):
    """Rule of an op linear in the operands at ``linear`` (others fixed; ``zero``: operands that are
    offsets, e.g. pad's padding value, set to 0 for the noise).  ``layout``: the op only moves,
    drops or pads features.  ``lin_sq(op, args, pos, v)``: the op with squared coefficients.
    ``product``: the op is linear in each operand separately (a product): a noise-free operand
    keeps its value, and only one operand may be noisy.  ``many_to_one(op)``: True when every
    input feature reaches at most one output feature (a sum, non-overlapping pooling): a
    diagonal block no other value carries then stays diagonal, exactly, with variance
    ``lin_sq(scale²)``.  ``reshape``: the op keeps the flat order (lazy blocks stay lazy)."""

    def rule(ctx, op, ins):
        for i, x in enumerate(ins):
            if _is_g(x) and i not in linear:
                return _elementwise_nonlinear(ctx, op, ins) if i in zero else _fallback(ctx, op, ins)
        means = [_mean(x) for x in ins]
        outs = _bind(op, means)
        if len(outs) != 1:
            return _fallback(ctx, op, ins)
        mean = outs[0]
        gpos = [i for i in linear if i < len(ins) and _is_g(ins[i])]
        if product and len(gpos) > 1:
            return _fallback(ctx, op, ins)
        filled = gpos if product else [p for p in linear if p < len(ins)]

        def call(pos_vals, fill):
            args = list(means)
            for p in filled:
                args[p] = fill(p)
            for p in zero:
                args[p] = fill(p)
            for p, v in pos_vals.items():
                args[p] = v
            return _bind(op, args)[0]

        zeros_f = lambda p: jnp.zeros(jnp.shape(means[p]), mean.dtype)  # noqa: E731
        minus1 = lambda p: jnp.full(jnp.shape(means[p]), -1, jnp.int32)  # noqa: E731
        blocks, dense = [], {}
        exact_sq = many_to_one is not None and lin_sq is not None and many_to_one(op)
        for i in gpos:
            x = ins[i]
            for b in x.blocks:
                if reshape and isinstance(b, G.Lazy):
                    blocks.append(G.Lazy(b.sid, b.left.reshape(mean.shape), b.a, b.right))
                    continue
                if isinstance(b, G.Diag) and exact_sq and b.sid not in ctx.live and len(gpos) == 1:
                    blocks.append(G.Diag(G.fresh(), G._safe_sqrt(lin_sq(op, means, i, jnp.square(b.scale)))))
                    continue
                if isinstance(b, G.Diag):
                    if layout:
                        nb = G.layout_diag(b, lambda s, i=i: call({i: s}, minus1), lambda v, i=i: call({i: v}, zeros_f), x.shape)
                        if nb is not None:
                            blocks.append(nb)
                            continue
                    if ctx.mode == "lowrank":
                        if lin_sq is not None:
                            v = lin_sq(op, means, i, jnp.square(b.scale))
                        else:
                            cols = G.to_dense(b, x.shape).cols
                            v = jnp.sum(jnp.square(jax.vmap(lambda c, i=i: call({i: c}, zeros_f), -1, -1)(cols)), -1)
                        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(v)))
                        continue
                dense.setdefault(b.sid, {})[i] = G.to_dense(b, x.shape).cols
        for sid, by_pos in dense.items():
            k = next(iter(by_pos.values())).shape[-1]
            pos = tuple(by_pos)

            def f(*cs, pos=pos):
                return call(dict(zip(pos, cs)), zeros_f)

            cols = jax.vmap(f, in_axes=-1, out_axes=-1)(*(by_pos[p] for p in pos))
            del k
            blocks.append(G.Dense(sid, cols))
        return [G.Gaussian(mean, G.merge(blocks, mean.shape))]

    return rule


def _sq_same(op, means, i, v):
    args = list(means)
    args[i] = v
    return _bind(op, args)[0]


def _disjoint_windows(op) -> bool:
    p = op.params
    return all(st >= d for st, d in zip(p["window_strides"], p["window_dimensions"])) and all(
        d == 1 for d in tuple(p.get("base_dilation", ())) + tuple(p.get("window_dilation", ()))
    )


for _name in ("reshape", "squeeze", "expand_dims"):
    RULES[_name] = _structural((0,), layout=True, reshape=True)
for _name in ("transpose", "rev", "slice", "broadcast_in_dim"):
    RULES[_name] = _structural((0,), layout=True)
RULES["pad"] = _structural((0,), layout=True, zero=(1,))
RULES["dynamic_slice"] = _structural((0,), layout=True)
RULES["gather"] = _structural((0,), layout=True)
RULES["concatenate"] = _structural(tuple(range(64)), layout=True)
RULES["dynamic_update_slice"] = _structural((0, 1), layout=True)
RULES["reduce_sum"] = _structural((0,), layout=False, lin_sq=_sq_same, many_to_one=lambda op: True)
_window_sum_generic = _structural((0,), layout=False, lin_sq=_sq_same, many_to_one=_disjoint_windows)


def _tiling_windows(op, shape) -> bool:
    """Windows that tile the input exactly (stride = window, no padding or dilation): a reshape-sum."""
    p = op.params
    return (
        tuple(p["window_strides"]) == tuple(p["window_dimensions"])
        and all(lo == 0 and hi == 0 for lo, hi in p["padding"])
        and all(d == 1 for d in tuple(p.get("base_dilation", ())) + tuple(p.get("window_dilation", ())))
        and all(n % w == 0 for n, w in zip(shape, p["window_dimensions"]))
    )


@_rule("reduce_window_sum")
def _window_sum_rule(ctx, op, ins):
    """Sum pooling; windows that tile the input are summed as a reshape (XLA:CPU's reduce_window is ~5x
    slower on the noise columns, and cannot absorb the multiplication of a lazy block)."""
    (x,) = ins
    if not _is_g(x) or not _tiling_windows(op, x.shape):
        return _window_sum_generic(ctx, op, ins)
    win = tuple(op.params["window_dimensions"])

    def lin(a):  # a: the input's shape, plus trailing axes
        nd = len(win)
        split = []
        for n, w in zip(a.shape[:nd], win):
            split += [n // w, w]
        r = a.reshape(tuple(split) + a.shape[nd:])
        return r.sum(axis=tuple(range(1, 2 * nd, 2)))

    mean = _bind(op, [x.mean])[0]
    nd = len(win)
    letters = "abcdefghijklmnopqrstuvw"
    blocks = []
    for b in x.blocks:
        if isinstance(b, G.Diag) and b.sid not in ctx.live and b.src is None:  # many-to-one: exact
            blocks.append(G.Diag(G.fresh(), G._safe_sqrt(lin(jnp.square(b.scale)))))
        elif isinstance(b, G.Lazy):  # Σ_window left·A as one contraction (no materialized columns)
            split = []
            for n, w in zip(x.shape, win):
                split += [n // w, w]
            a = b.a.reshape(tuple(split) + (-1,))
            keep = "".join(letters[2 * i] for i in range(nd))
            full = "".join(letters[i] for i in range(2 * nd))
            cols = jnp.einsum(f"{full},{full}z->{keep}z", b.left.reshape(split), a) * b.right
            blocks.append(G.Dense(b.sid, cols))
        elif isinstance(b, G.Diag) and ctx.mode == "lowrank":
            blocks.append(G.Diag(G.fresh(), G._safe_sqrt(lin(jnp.square(b.scale)))))
        elif isinstance(b, G.Channel) and win[b.axis] == 1:
            blocks.append(_compress_channel(G.Channel(b.sid, lin(b.u), b.axis), ctx))
        else:
            blocks.append(G.Dense(b.sid, lin(G.to_dense(b, x.shape).cols)))  # lin takes the column axis as is
    return [G.Gaussian(mean, G.merge(blocks, mean.shape))]
RULES["cumsum"] = _structural((0,), layout=False, lin_sq=_sq_same)
RULES["scatter-add"] = _structural((0, 2), layout=False)
RULES["scatter_add"] = RULES["scatter-add"]


# ----------------------------------------------------------------------------------
# Matrix products and convolutions
# ----------------------------------------------------------------------------------


def _safe_kernel(k: Array, like: Optional[Array] = None) -> Array:
    """A variance kernel XLA cannot see as a broadcast constant.

    jaxlib 0.10.2's XLA:CPU miscompiles a convolution or matrix product whose one operand is
    a broadcast constant (a scalar weight-noise variance) and whose other operand is a
    reduction (a variance ``d + Σ F²``) under ``jit(vmap)`` — an optimization barrier does not
    prevent it (see :mod:`noisejax._backend`, which also sets the XLA flag that avoids it).
    ``k + 0·like`` (``like``: the real kernel) does; float ``0·x`` is not folded.
    """
    return k if like is None else k + jnp.zeros((), k.dtype) * like


def window_sum(x: Array, kernel_shape, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) -> Array:
    """``conv(x, ones(kernel_shape))`` for ONE example ``x`` without a convolution (one output channel).

    The sum of ``x`` over each convolution window and all input channels, as a channel sum
    and a :func:`jax.lax.reduce_window` with the convolution's window, strides and padding;
    returned in the convolution's output layout with a feature axis of size 1.

    Example::

        >>> window_sum(jnp.ones((4, 4, 2)), (3, 3, 2, 5), (1, 1), "SAME")[0, :, 0]   # 2 channels × 4, 6 or 9 pixels
        Array([ 8., 12., 12.,  8.], dtype=float32)
    """
    xb = x[None]
    cdn = lax.conv_dimension_numbers(xb.shape, tuple(kernel_shape), dimension_numbers)
    nd = xb.ndim
    s = jnp.sum(xb, axis=cdn.lhs_spec[1], keepdims=True)
    window, wstrides = [1] * nd, [1] * nd
    for i, (ld, rd) in enumerate(zip(cdn.lhs_spec[2:], cdn.rhs_spec[2:])):
        window[ld], wstrides[ld] = int(kernel_shape[rd]), int(strides[i])
    if isinstance(padding, str):
        pads = padding
    else:
        pads = [(0, 0)] * nd
        for i, ld in enumerate(cdn.lhs_spec[2:]):
            pads[ld] = tuple(padding[i])
    ws = lax.reduce_window(s, jnp.zeros((), s.dtype), lax.add, tuple(window), tuple(wstrides), pads)
    perm = [0] * nd
    for k in range(nd):
        perm[cdn.out_spec[k]] = cdn.lhs_spec[k]
    return jnp.transpose(ws, perm)[0]


def _sq_other(op, means, i, v):
    args = list(means)
    j = 1 - i
    args[i] = v
    args[j] = jnp.square(means[j])
    return _bind(op, args)[0]


_linear_product = _structural((0, 1), layout=False, lin_sq=_sq_other, product=True)


@_rule("dot_general")
def _dot_rule(ctx, op, ins):
    a, b = ins
    for w_pos in (1, 0):  # a noisy parameter with independent entries: the weight-noise rule
        w, x = ins[w_pos], ins[1 - w_pos]
        if _is_param(ctx, w_pos):
            var_w = _private_weight_variance(ctx, w, x)
            if var_w is not None:
                return [_dot_weight(ctx, op, x, w, var_w, 1 - w_pos)]
    if _is_g(a) and _is_g(b):
        return [_bilinear(ctx, op, a, b)]
    if _is_g(a):
        fast = _dense_fast_path(ctx, op, a, b)
        if fast is not None:
            return [fast]
    return _linear_product(ctx, op, ins)


def _is_param(ctx, pos) -> bool:
    return pos < len(ctx.params) and bool(ctx.params[pos])


def _private_weight_variance(ctx, w, x) -> Optional[Array]:
    """Per-entry variance of ``w`` if its noise is independent per entry and private to this op."""
    if not _is_g(w) or not w.blocks or not all(isinstance(b, G.Diag) for b in w.blocks):
        return None
    other = G.sids(x)
    if any(b.sid in ctx.live or b.sid in other for b in w.blocks):
        return None
    return G.variance(w)


def _dense_fast_path(ctx, op, x, W) -> Optional[Gaussian]:
    """``x W`` for one example's vector ``x`` and a shared matrix ``W``: diagonal blocks become lazy."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    if jnp.ndim(W) != 2 or lb or rb or tuple(rc) != (0,) or tuple(lc) != (x.mean.ndim - 1,):
        return None
    n_in = W.shape[0]
    if x.mean.size != n_in or ctx.mode == "lowrank":
        return None
    mean = _bind(op, [x.mean, W])[0]
    blocks = []
    for b in x.blocks:
        if isinstance(b, G.Diag) and b.src is None:
            blocks.append(G.Lazy(b.sid, jnp.ones(mean.shape, mean.dtype), W.T, b.scale.reshape(n_in)))
        elif isinstance(b, G.Lazy):
            cols = ((W * b.left.reshape(n_in)[:, None]).T @ b.a) * b.right[None, :]
            blocks.append(G.Dense(b.sid, cols.reshape(mean.shape + (b.a.shape[1],))))
        else:
            d = G.to_dense(b, x.shape)
            cols = jnp.einsum("jk,jo->ok", d.cols.reshape(n_in, -1), W)
            blocks.append(G.Dense(b.sid, cols.reshape(mean.shape + (d.cols.shape[-1],))))
    return G.Gaussian(mean, G.merge(blocks, mean.shape))


def _canonical_dot(op, x_ndim, w_ndim, x_pos):
    """Axis permutations to (B, I, J) for x and (B, J, O) for w, and whether the output is (B, O, I)."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    cx, bx = (lc, lb) if x_pos == 0 else (rc, rb)
    cw, bw = (rc, rb) if x_pos == 0 else (lc, lb)
    fx = [d for d in range(x_ndim) if d not in cx and d not in bx]
    fw = [d for d in range(w_ndim) if d not in cw and d not in bw]
    return tuple(bx) + tuple(fx) + tuple(cx), tuple(bw) + tuple(cw) + tuple(fw), (len(bx), len(fx), len(cx)), x_pos == 1


def pw_batch_contract(op, x_pos) -> tuple:
    """The kernel operand's batch and contracting dimensions."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    return tuple(rb) + tuple(rc) if x_pos == 0 else tuple(lb) + tuple(lc)


def _dot_weight(ctx, op, x, w, var_w, x_pos) -> Gaussian:
    """``dot_general`` with a kernel whose entries carry independent private noise (module doc)."""
    xm = _mean(x)
    args = [None, None]
    args[x_pos], args[1 - x_pos] = xm, w.mean
    mean = _bind(op, args)[0]
    # the part linear in x's noise, through the mean kernel
    if _is_g(x):
        lin_ins = [None, None]
        lin_ins[x_pos], lin_ins[1 - x_pos] = x, w.mean
        out = _linear_product(ctx, op, lin_ins)[0]
    else:
        out = G.Gaussian(mean, ())
    px, pw, (nb, nf, nc), swap = _canonical_dot(op, xm.ndim, w.mean.ndim, x_pos)
    bshape = [xm.shape[d] for d in px[:nb]]
    B = int(np.prod(bshape)) if bshape else 1
    I = int(np.prod([xm.shape[d] for d in px[nb : nb + nf]])) if nf else 1
    J = int(np.prod([xm.shape[d] for d in px[nb + nf :]])) if nc else 1
    X = jnp.transpose(xm, px).reshape(B, I, J)
    S2 = jnp.transpose(_safe_kernel(var_w, w.mean), pw).reshape(B, J, -1)
    O = S2.shape[-1]

    def to_out(c):  # (B, I, O, *rest) -> output layout
        rest = c.shape[3:]
        if swap:
            c = jnp.swapaxes(c, 1, 2)
        return c.reshape(mean.shape + rest)

    blocks = list(out.blocks)
    diag_var = 0.0
    if _is_g(x):
        vx = jnp.transpose(G.variance(x), px).reshape(B, I, J)
        diag_var = jnp.einsum("bij,bjo->bio", vx, S2)
    if I == 1 or ctx.mode == "lowrank":
        diag_var = diag_var + jnp.einsum("bij,bjo->bio", jnp.square(X), S2)
    else:
        U, r = _gram_factor(X, S2)  # (B, O, I, r)
        n_free_w = w.mean.ndim - len(pw_batch_contract(op, x_pos))
        if B == 1 and n_free_w == 1 and not swap:  # output channel o's own kernel entries: a per-channel block
            u = jnp.moveaxis(U[0], 0, 1)  # (I, O, r)
            blocks.append(G.Channel(G.fresh(), u.reshape(mean.shape + (u.shape[-1],)), mean.ndim - 1))
        else:
            eyeB, eyeO = jnp.eye(B, dtype=mean.dtype), jnp.eye(O, dtype=mean.dtype)
            cols = jnp.einsum("boiq,bc,op->biocpq", U, eyeB, eyeO).reshape(B, I, O, B * O * r)
            blocks.append(G.Dense(G.fresh(), to_out(cols)))
    if not (isinstance(diag_var, float) and diag_var == 0.0):
        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(to_out(diag_var))))
    return G.Gaussian(mean, G.merge(blocks, mean.shape))


def _compress_channel(b: "G.Channel", ctx) -> "G.Channel":
    """A private per-channel block with more sources than positions per channel, refactored (exactly)
    to as many sources as positions: ``u_c u_cᵀ = v_c v_cᵀ`` with ``v_c`` from the eigendecomposition."""
    if b.sid in ctx.live:
        return b
    shape = b.u.shape[:-1]
    r = b.u.shape[-1]
    uc = jnp.moveaxis(b.u, b.axis, 0)  # (C, *rest, r)
    rest = uc.shape[1:-1]
    p = int(np.prod(rest)) if rest else 1
    if r <= p:
        return b
    uc = uc.reshape(uc.shape[0], p, r)
    gram = jnp.einsum("cpq,ckq->cpk", uc, uc)
    lam, vec = jnp.linalg.eigh(gram)
    v = vec * G._safe_sqrt(lam)[:, None, :]  # (C, p, p)
    v = jnp.moveaxis(v.reshape((uc.shape[0],) + rest + (p,)), 0, b.axis)
    return G.Channel(G.fresh(), v.reshape(shape + (p,)), b.axis)


def _gram_factor(X: Array, S2: Array):
    """``U`` with ``U_bo U_boᵀ = X_b diag(S2_b[:, o]) X_bᵀ``: ``(B, O, I, r)``, ``r = min(I, J)``."""
    B, I, J = X.shape
    if J <= I:
        U = X[:, None, :, :] * jnp.sqrt(jnp.swapaxes(S2, 1, 2))[:, :, None, :]  # (B, O, I, J)
        return U, J
    Gm = jnp.einsum("bij,bjo,bkj->boik", X, S2, X)
    lam, V = jnp.linalg.eigh(Gm)
    return V * G._safe_sqrt(lam)[..., None, :], I


def _bilinear(ctx, op, a: Gaussian, b: Gaussian) -> Gaussian:
    """``dot_general`` of two noisy operands (module doc: products)."""
    mean = _bind(op, [a.mean, b.mean])[0]
    left = _linear_product(ctx, op, [a, b.mean])[0]
    right = _linear_product(ctx, op, [a.mean, b])[0]
    blocks = list(G.merge(left.blocks + right.blocks, mean.shape))
    if ctx.method == "gaussian":
        bb = {blk.sid: blk for blk in b.blocks}
        for blk in a.blocks:
            if blk.sid in bb:
                ca = G.to_dense(blk, a.shape).cols
                cb = G.to_dense(bb[blk.sid], b.shape).cols
                mean = mean + jnp.sum(jax.vmap(lambda p, q: _bind(op, [p, q])[0], -1, -1)(ca, cb), axis=-1)
        resid = _bind(op, [G.variance(a), _safe_kernel(G.variance(b), b.mean)])[0]
        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(resid)))
    return G.Gaussian(mean, tuple(blocks))


@_rule("conv_general_dilated")
def _conv_rule(ctx, op, ins):
    x, w = ins
    if _is_g(w):
        var_w = _private_weight_variance(ctx, w, x)
        if var_w is not None and op.params.get("batch_group_count", 1) == 1:
            return [_conv_weight(ctx, op, x, w, var_w)]
        if _is_g(x):
            return [_bilinear(ctx, op, x, w)]
        return _linear_product(ctx, op, ins)
    return [_lazy_linear(ctx, op, x, lambda v: _bind(op, [v, w])[0], lambda v: _bind(op, [v, jnp.square(w)])[0], w)]


_LAZY_MAX = 1 << 24  # entries of a shared operator matrix


def _conv_channel_ok(op, b) -> bool:
    p = op.params
    return (op.prim.name == "conv_general_dilated" and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
            and b.axis == p["dimension_numbers"].lhs_spec[1])


def _conv_channel(op, b: "G.Channel", w: Array) -> "G.Dense":
    """A convolution of a per-channel block: source (c, q) loads on input channel c only, so each is a
    one-channel map convolved with the kernel's slice ``[:, :, c, :]`` — one grouped convolution
    (``feature_group_count = C``) over the ``r`` sources folded into the batch."""
    p = op.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    u = b.u  # (*in_shape, r)
    r = u.shape[-1]
    nb = lhs_spec[0]
    n_ch, n_out = w.shape[rhs_spec[1]], w.shape[rhs_spec[0]]
    # fold the sources into the batch: (..., N, ...) -> (..., r*N, ...)
    lhs = jnp.moveaxis(u, -1, nb)
    lhs = lhs.reshape(lhs.shape[:nb] + (r * lhs.shape[nb + 1],) + lhs.shape[nb + 2 :])
    nd = len(rhs_spec) - 2
    hwio = jnp.transpose(w, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))  # (spatial..., C, O)
    kernel = hwio.reshape(hwio.shape[:nd] + (1, n_ch * n_out))  # group c -> outputs c*O .. c*O+O-1
    dn_g = lax.ConvDimensionNumbers(lhs_spec, tuple(range(nd, nd + 2))[::-1] + tuple(range(nd)), out_spec)
    out = lax.conv_general_dilated(
        lhs, kernel, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn_g,
        feature_group_count=n_ch, precision=p.get("precision"),
    )
    ob, of = out_spec[0], out_spec[1]
    out = out.reshape(out.shape[:ob] + (r, out.shape[ob] // r) + out.shape[ob + 1 :])  # split r*N
    of_s = of + 1 if of > ob else of
    out = out.reshape(out.shape[:of_s] + (n_ch, n_out) + out.shape[of_s + 1 :])  # split C*O
    # axes now: ... r at ob, N at ob+1, ..., C at of_s, O at of_s+1, ...; target (*out_shape, C, r)
    c_axis = of_s
    r_axis = ob
    rest = [a for a in range(out.ndim) if a not in (r_axis, c_axis)]
    out = jnp.transpose(out, tuple(rest) + (c_axis, r_axis))
    return G.Dense(b.sid, out.reshape(out.shape[:-2] + (n_ch * r,)))


def _lazy_linear(ctx, op, x: Gaussian, lin: Callable[[Array], Array], lin_sq: Callable[[Array], Array], op_kernel: Array) -> Gaussian:
    """A linear map with a shared operator (a convolution with a parameter kernel): private
    diagonal blocks become lazy ``diag(1) A diag(scale)`` with ``A = lin(I)`` computed once for
    all examples; the other blocks are mapped column by column."""
    mean = lin(x.mean)
    lazy_ok = ctx.mode != "lowrank" and x.mean.size * mean.size <= _LAZY_MAX
    private = [b for b in x.blocks if lazy_ok and isinstance(b, G.Diag) and b.src is None and b.sid not in ctx.live]
    channel = [b for b in x.blocks if isinstance(b, G.Channel) and _conv_channel_ok(op, b)]
    rest = [b for b in x.blocks if b not in private and b not in channel]
    out = G.map_linear(G.Gaussian(x.mean, tuple(rest)), lin, mean, mode=ctx.mode, lin_sq=lin_sq)
    blocks = list(out.blocks)
    if private:
        n = x.mean.size
        basis = jnp.eye(n, dtype=x.dtype).reshape((n,) + x.shape)
        a = jax.vmap(lin)(basis).reshape(n, -1).T  # (n_out, n_in): the same for every example
        for b in private:
            blocks.append(G.Lazy(b.sid, jnp.ones(mean.shape, mean.dtype), a, b.scale.reshape(n)))
    blocks += [_conv_channel(op, b, op_kernel) for b in channel]
    return G.Gaussian(mean, G.merge(blocks, mean.shape))


def patch_precision(precision):
    """The input's precision of a convolution for :func:`lax.conv_general_dilated_patches` (which takes one;
    under ``jax.default_matmul_precision`` the op carries a pair)."""
    return precision[0] if isinstance(precision, (tuple, list)) else precision


def _conv_weight(ctx, op, x, w, var_w) -> Gaussian:
    """Convolution with a kernel whose entries carry independent private noise (module doc)."""
    p = op.params
    xm = _mean(x)
    mean = _bind(op, [xm, w.mean])[0]
    wm = w.mean
    if _is_g(x):  # the noise of x through the mean kernel (lazy / per-channel forms kept)
        out = _lazy_linear(ctx, op, x, lambda v: _bind(op, [v, wm])[0], lambda v: _bind(op, [v, jnp.square(wm)])[0], wm)
    else:
        out = G.Gaussian(mean, ())
    blocks = list(out.blocks)
    kvar = _safe_kernel(var_w, w.mean)
    diag_var = _bind(op, [G.variance(x), kvar])[0] if _is_g(x) else None
    if ctx.mode == "lowrank":
        extra = _bind(op, [jnp.square(xm), kvar])[0]
        diag_var = extra if diag_var is None else diag_var + extra
    else:
        dn = p["dimension_numbers"]
        rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
        spatial = tuple(w.mean.shape[d] for d in rhs_spec[2:])
        patches = lax.conv_general_dilated_patches(
            xm, spatial, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn, patch_precision(p.get("precision"))
        )
        perm = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
        P = jnp.transpose(patches, perm)
        canon_shape = P.shape[:-1]
        I = int(np.prod(canon_shape))
        P = P.reshape(I, -1)  # (I, C*K), features ordered (c, spatial...)
        O = w.mean.shape[rhs_spec[0]]
        S2 = jnp.transpose(var_w, (rhs_spec[1],) + tuple(rhs_spec[2:]) + (rhs_spec[0],)).reshape(-1, O)  # (C/G*K, O)
        groups = p["feature_group_count"]
        cg = S2.shape[0]
        us = []
        for gi in range(groups):
            Xg = P[:, gi * cg : (gi + 1) * cg]
            og = slice(gi * (O // groups), (gi + 1) * (O // groups))
            U, r = _gram_factor(Xg[None], S2[None, :, og])
            us.append(U[0])  # (O/G, I, r)
        U = jnp.concatenate(us, axis=0)  # (O, I, r): output channel o's own kernel entries
        u = jnp.moveaxis(U, 0, 1).reshape(canon_shape + (O, U.shape[-1]))  # canonical (batch, spatial..., O, r)
        u = jnp.transpose(u, tuple(np.argsort(perm)) + (len(perm),))
        blocks.append(G.Channel(G.fresh(), u, out_spec[1]))
    if diag_var is not None:
        blocks.append(G.Diag(G.fresh(), G._safe_sqrt(diag_var)))
    return G.Gaussian(mean, G.merge(blocks, mean.shape))


# ----------------------------------------------------------------------------------
# Elementwise nonlinearities
# ----------------------------------------------------------------------------------


def _per_element(fn: Callable[[Array], Array], shape) -> Callable[[Array], Array]:
    """``fn`` traced for ``shape``, applied to arrays with extra trailing quadrature axes (via vmap)."""

    def f(x):
        if x.shape == tuple(shape):
            return fn(x)
        return jax.vmap(f, in_axes=-1, out_axes=-1)(x)

    return f


#: correlated blocks with at most this many sources get second-order (Hermite) terms at activations
#: of at least this many features: there the terms add up coherently over the next layer's fan-in
#: (measured on the Flax CNN: worst per-logit error 28 % -> 13 %), while on narrow layers the
#: non-Gaussian η they feed into the next activation costs more than they bring (a 12-wide relu MLP
#: with one strong correlated source: 5.0 % -> 6.7 % at layer 3)
SECOND_ORDER_MAX_SOURCES = 64
SECOND_ORDER_MIN_FEATURES = 64


def activation_state(
    ctx: Context, g: Gaussian, fn: Callable[[Array], Array], *, kind: Optional[str] = None, shift: Any = 0.0, linearize: bool = False
) -> Gaussian:
    """``y = fn(x)`` elementwise for a Gaussian ``x``: gains on the loadings, the residue as new noise.

    With ``x_i = m_i + Σ_r L_ir ξ_r + …`` the Hermite expansion of ``f(x_i)`` in each
    source gives, exactly for jointly Gaussian inputs (Stein's lemma once and twice)::

        f(x_i) = E f + E f'(x_i) Σ_r L_ir ξ_r + E f''(x_i)/√2 Σ_r L_ir² η_r + residue,   η_r = (ξ_r² − 1)/√2

    The first-order loadings keep every block's sources; the second-order sources
    ``η_r`` are kept for correlated blocks with few sources on wide layers (a shared
    noise draw passing a nonlinearity stays coherent across neurons; the ``η`` of a
    block are the same sources wherever it goes; see ``SECOND_ORDER_*``); the rest of
    ``Var f`` is independent noise.
    ``kind``/``shift``: closed forms of :func:`noisejax.quadrature.activation_moments`
    applied to ``x − shift`` (``max(x, c) = c + relu(x − c)``).
    """
    v = G.variance(g)
    method = "linearized" if (linearize or ctx.method == "linearized") else "gaussian"

    def moments(m):
        if kind is not None and method == "gaussian":
            return Q.activation_moments(fn, m - shift, v, method=method, kind=kind, quad_nodes=ctx.quad_nodes)
        return Q.activation_moments(_per_element(fn, g.shape), m, v, method=method, quad_nodes=ctx.quad_nodes)

    small = [b for b in g.blocks if isinstance(b, G.Dense) and b.cols.shape[-1] <= SECOND_ORDER_MAX_SOURCES
             and not G.is_square_sid(b.sid)] if g.mean.size >= SECOND_ORDER_MIN_FEATURES else []
    if method == "gaussian" and small:
        (ef, vf, gain), (_, _, curv) = jax.jvp(moments, (g.mean,), (jnp.ones_like(g.mean),))  # curv = E f''
    else:
        ef, vf, gain = moments(g.mean)
    if kind is not None and method == "gaussian":
        ef = ef + shift
    out = G.scale(g, gain, mean=ef)
    if method == "gaussian":
        second = [G.Dense(G.square_sid(b.sid), (curv / np.sqrt(2.0))[..., None] * jnp.square(b.cols)) for b in small]
        explained = jnp.square(gain) * v + sum((jnp.sum(jnp.square(b.cols), -1) for b in second), jnp.zeros_like(v))
        resid = jnp.maximum(vf - explained, 0.0)
        out = G.Gaussian(out.mean, G.merge(out.blocks + tuple(second), out.mean.shape) + (G.Diag(G.fresh(), G._safe_sqrt(resid)),))
    return out


_CLOSED = {"erf": "erf", "exp": "exp", "square": "square"}


def _elementwise_nonlinear(ctx, op, ins):
    """An elementwise nonlinear op: one noisy operand → :func:`activation_state`; several → linearized."""
    gpos = [i for i, x in enumerate(ins) if _is_g(x)]
    means = [_mean(x) for x in ins]
    out_shape = op.out_avals[0].shape
    if len(gpos) != 1 or ins[gpos[0]].shape != tuple(out_shape):
        return _linearize(ctx, op, ins)
    i = gpos[0]
    g = ins[i]

    def fn(x):
        args = list(means)
        args[i] = x
        return _bind(op, args)[0]

    name = op.prim.name
    kind = _CLOSED.get(name)
    if name == "integer_pow" and op.params.get("y") == 2:
        kind = "square"
    if name in ("max", "min"):
        c = means[1 - i]
        if name == "max":
            if jnp.ndim(c) == 0 and _static_eq(c, -np.inf):
                return [g]
            return [activation_state(ctx, g, fn, kind="relu", shift=jnp.broadcast_to(c, g.shape))]
        if jnp.ndim(c) == 0 and _static_eq(c, np.inf):
            return [g]
        neg = G.scale(g, -1.0)  # min(x, c) = −max(−x, −c)
        out = activation_state(ctx, neg, lambda x: -fn(-x), kind="relu", shift=-jnp.broadcast_to(c, g.shape))
        return [G.scale(out, -1.0)]
    partial = name in _PARTIAL or (name == "div" and i == 1) or (name == "integer_pow" and op.params.get("y", 1) < 0)
    return [activation_state(ctx, g, fn, kind=kind, linearize=partial)]


def _static_eq(c, value) -> bool:
    try:
        return bool(np.asarray(c) == value)
    except Exception:
        return False


for _name in (
    "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "erf", "erfc", "erf_inv", "sin", "cos", "tan",
    "atan", "asinh", "acosh", "atanh", "asin", "acos", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "abs",
    "sign", "round", "floor", "ceil", "lgamma", "digamma", "pow", "clamp", "max", "min",
):
    RULES[_name] = _elementwise_nonlinear


def _max_rule_two(ctx, op, ins):
    a, b = ins
    if _is_g(a) and _is_g(b):
        shape = op.out_avals[0].shape
        a, b = _broadcast(ctx, a, shape), _broadcast(ctx, b, shape)
        if op.prim.name == "max":
            return [gaussian_max(ctx, a, b)]
        return [G.scale(gaussian_max(ctx, G.scale(a, -1.0), G.scale(b, -1.0)), -1.0)]
    return _elementwise_nonlinear(ctx, op, ins)


RULES["max"] = _max_rule_two
RULES["min"] = _max_rule_two


def _product(ctx, a: Gaussian, b: Gaussian) -> Gaussian:
    """Elementwise ``a·b`` of two noisy values (module doc)."""
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a, b = _broadcast(ctx, a, shape), _broadcast(ctx, b, shape)
    lin = G.add(G.scale(a, b.mean), G.scale(b, a.mean), mean=a.mean * b.mean)
    if ctx.method != "gaussian":
        return lin
    c = G.cross(a, b)
    resid = G.variance(a) * G.variance(b) + jnp.square(c)
    return G.Gaussian(lin.mean + c, lin.blocks + (G.Diag(G.fresh(), G._safe_sqrt(resid)),))


# ----------------------------------------------------------------------------------
# Maxima
# ----------------------------------------------------------------------------------


def gaussian_max(ctx, a: Gaussian, b: Gaussian) -> Gaussian:
    """Clark's moments of ``max(a, b)`` for jointly Gaussian ``a``, ``b`` of the same shape::

        θ² = Var(a − b),  α = (m_a − m_b)/θ,  d = m_a − m_b
        E = m_a Φ(α) + m_b Φ(−α) + θ φ(α)
        Var = Var a Φ(α) + Var b Φ(−α) + d² Φ(α)Φ(−α) + d θ φ(α)(1 − 2Φ(α)) − θ² φ(α)²

    loadings ``Φ(α) L_a + Φ(−α) L_b`` (Stein), the rest of the variance as new noise.

    Both are written in a form without catastrophic cancellation, which matters in float32:
    ``θ²`` is the variance of the difference's loadings (not ``Var a + Var b − 2 Cov``,
    which loses every digit when neighbours of a pooling window share most of their noise),
    and the variance is Clark's ``E[max²] − E²`` expanded so that no term of the size of a
    squared mean is subtracted (that form lost ≈ 5 digits at SNR 10⁵; jit and eager then
    disagreed by up to 80 % on a ResNet's max pool on an AVX2 CPU).
    """
    ma, mb = a.mean, b.mean
    d = ma - mb
    va, vb = G.variance(a), G.variance(b)
    th2 = G.variance(G.add(a, G.scale(b, -1.0), mean=d))
    tiny = 1e-30
    ok = th2 > tiny * (1.0 + jnp.square(ma) + jnp.square(mb))
    th = jnp.sqrt(jnp.where(ok, th2, 1.0))
    alpha = jnp.where(ok, d / th, jnp.where(ma >= mb, jnp.inf, -jnp.inf))
    cdf = jax.scipy.special.ndtr(alpha)
    pdf = jnp.where(ok, jnp.exp(-0.5 * jnp.square(jnp.where(ok, alpha, 0.0))) / math.sqrt(2 * math.pi), 0.0)
    thp = jnp.where(ok, th * pdf, 0.0)
    e = ma * cdf + mb * (1.0 - cdf) + thp
    lin = G.add(G.scale(a, cdf), G.scale(b, 1.0 - cdf), mean=e)
    if ctx.method != "gaussian":
        return G.Gaussian(jnp.maximum(ma, mb), lin.blocks)
    ccdf = 1.0 - cdf
    vmax = va * cdf + vb * ccdf + jnp.square(d) * cdf * ccdf + d * thp * (ccdf - cdf) - jnp.square(thp)
    vmax = jnp.maximum(vmax, 0.0)
    resid = jnp.maximum(vmax - G.variance(lin), 0.0)
    return G.Gaussian(e, lin.blocks + (G.Diag(G.fresh(), G._safe_sqrt(resid)),))


def _window_slices(ctx, x: Gaussian, op) -> list:
    """The states of the input elements under each window offset (one per offset), with padding."""
    p = op.params
    dims, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    base, wdil = p.get("base_dilation", (1,) * len(dims)), p.get("window_dilation", (1,) * len(dims))
    if any(d != 1 for d in base):
        return None
    big = jnp.asarray(-1e30 if op.prim.name == "reduce_window_max" else 1e30, x.dtype)
    if any(lo or hi for lo, hi in padding):
        cfg = tuple((lo, hi, 0) for lo, hi in padding)
        padded_mean = lax.pad(x.mean, big, cfg)
        f = lambda a: lax.pad(a, jnp.zeros((), a.dtype), cfg)  # noqa: E731
        fi = lambda a: lax.pad(a, jnp.full((), -1, a.dtype), cfg)  # noqa: E731
        x = G.map_linear(x, f, padded_mean, mode=ctx.mode, layout=(fi, f))
    out_shape = op.out_avals[0].shape
    states = []
    for offset in np.ndindex(*dims):
        start = tuple(int(o) * d for o, d in zip(offset, wdil))
        limit = tuple(s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides))
        f = lambda a, start=start, limit=limit: lax.slice(a, start, limit, strides)  # noqa: E731
        states.append(G.map_linear(x, f, f(x.mean), mode=ctx.mode, layout=(f, f)))
    return states


@_rule("reduce_window_max", "reduce_window_min")
def _pool_max_rule(ctx, op, ins):
    (x,) = ins
    states = _window_slices(ctx, x, op)
    if states is None:
        return _linearize(ctx, op, ins)
    sign = 1.0 if op.prim.name == "reduce_window_max" else -1.0
    acc = G.scale(states[0], sign)
    for s in states[1:]:
        acc = gaussian_max(ctx, acc, G.scale(s, sign))
    return [G.scale(acc, sign) if sign < 0 else acc]


_MAX_CLARK = 256


@_rule("reduce_max", "reduce_min")
def _reduce_max_rule(ctx, op, ins):
    (x,) = ins
    axes = tuple(op.params["axes"])
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    if n > _MAX_CLARK:
        return _linearize(ctx, op, ins)
    sign = 1.0 if op.prim.name == "reduce_max" else -1.0
    keep = [d for d in range(x.mean.ndim) if d not in axes]
    perm = tuple(keep) + axes
    out_shape = tuple(x.shape[d] for d in keep)
    f = lambda a: jnp.transpose(a, perm).reshape(out_shape + (n,))  # noqa: E731
    flat = G.map_linear(x, f, f(x.mean), mode=ctx.mode, layout=(f, f))
    acc = None
    for k in range(n):
        g = lambda a, k=k: a[..., k]  # noqa: E731
        s = G.scale(G.map_linear(flat, g, g(flat.mean), mode=ctx.mode, layout=(g, g)), sign)
        acc = s if acc is None else gaussian_max(ctx, acc, s)
    return [G.scale(acc, sign) if sign < 0 else acc]


# ----------------------------------------------------------------------------------
# Generic first order
# ----------------------------------------------------------------------------------


def _fallback(ctx, op, ins, what: str = ""):
    """``unknown='linearize'``: the first-order rule; else the one error for an operation without a moment rule."""
    if ctx.unknown == "linearize":
        return _linearize(ctx, op, ins)
    what = what or f"the moment rule of '{op.prim.name}' does not cover a noisy operand in this position"
    raise UnsupportedPrimitiveError(
        f"analytic: {what}, at {op.source}; "
        "estimate this model by Monte Carlo (noisejax.noisy + noisejax.simulate.monte_carlo), "
        "or pass unknown='linearize' for a first-order approximation"
    )


def _linearize(ctx, op, ins):
    """First order through ``jax.jvp``: ``m' = f(m)``, loadings ``J_f(m) L`` (per shared source set)."""
    means = [_mean(x) for x in ins]
    gpos = [i for i, x in enumerate(ins) if _is_g(x) and _is_float(x.mean)]

    def f(*gs):
        args = list(means)
        for p, v in zip(gpos, gs):
            args[p] = v
        return tuple(_bind(op, args))

    primals = tuple(means[i] for i in gpos)
    outs = f(*primals)
    sids: dict = {}
    for i in gpos:
        for b in ins[i].blocks:
            sids.setdefault(b.sid, {})[i] = b
    out_blocks = [[] for _ in outs]
    for sid, by_pos in sids.items():
        n = {p: G.to_dense(b, ins[p].shape).cols for p, b in by_pos.items()}
        k = next(iter(n.values())).shape[-1]
        tangents = [n[p] if p in n else jnp.zeros(ins[p].shape + (k,), ins[p].dtype) for p in gpos]

        def jv(*ts):
            return jax.jvp(f, primals, ts)[1]

        cols = jax.vmap(jv, in_axes=-1, out_axes=-1)(*tangents)
        for j, c in enumerate(cols):
            out_blocks[j].append(G.Dense(sid, c))
    res = []
    for o, blocks, aval in zip(outs, out_blocks, op.out_avals):
        if not jnp.issubdtype(aval.dtype, jnp.inexact):
            res.append(o)
        else:
            res.append(G.Gaussian(o, tuple(blocks)))
    return res
