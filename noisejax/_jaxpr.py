"""The jaxpr of a user's function as noisejax sees it: a flat program, its sites and its clusters.

Shared by the two interpretations of :mod:`noisejax.interpret` (sampling and
moments), so that both put noise at exactly the same places.

* :func:`flatten` inlines calls (``jit``/``pjit``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``closed_call``, ``checkpoint``) into one list of
  :class:`Op` in evaluation order; each op keeps its *path* (indices of the
  eqns that lead to it through the nested calls), its Flax/JAX name stack and
  its user source line.  Control flow (``cond``, ``while``, ``scan``) stays one
  opaque op.
* **Elementwise clusters**: maximal groups of elementwise ops that compute a
  function of ONE data value (the cluster's *root*), with parameters and
  literals as the only other operands — e.g. the dozen primitives of an
  inlined ``jax.nn.gelu``, or ``relu(x + b)``.  A cluster containing an
  activation primitive is an activation; its outputs are the activation sites.
* **Sites** (:class:`Site`): every place noise can go — activation outputs,
  ``dot_general``/``conv_general_dilated`` outputs (an analog matrix-vector
  product's output) and explicit :func:`mark` points — numbered in program
  order.  The number of a site does not depend on which sites are selected.

Everything here runs at trace time on Python objects; nothing is compiled.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.extend import core as _xcore

from noisejax.errors import InvalidArgumentError

__all__ = ["Site", "Op", "Program", "flatten", "mark", "mark_p", "SITE_KINDS"]

SITE_KINDS = ("activation", "matmul", "marked")

# ----------------------------------------------------------------------------------
# The explicit site marker (used by noisejax.layers.NoiseSite and by users)
# ----------------------------------------------------------------------------------

mark_p = _xcore.Primitive("noisejax_site")
mark_p.def_impl(lambda x, *, tag: x)
mark_p.def_abstract_eval(lambda x, *, tag: x)


def _mark_lowering(ctx, x, *, tag):
    return [x]


def _register_mark() -> None:
    from jax.interpreters import ad, batching, mlir

    mlir.register_lowering(mark_p, _mark_lowering)
    ad.deflinear2(mark_p, lambda ct, x, *, tag: [ct])
    batching.primitive_batchers[mark_p] = lambda args, dims, *, tag: (mark_p.bind(args[0], tag=tag), dims[0])


_register_mark()


def mark(x: jax.Array, tag: str = "neuron") -> jax.Array:
    """An explicit noise site: the identity, recorded in the jaxpr as a ``"marked"`` site.

    ``tag`` is a short static label (``"neuron"`` for neuron noise; ``"weight"`` for a
    weight whose noise is given per site).  Free under ``jit``; differentiable.

    Example::

        >>> h = noisejax.interpret.mark(jnp.tanh(x @ W))   # noise goes here with sites="marked"
    """
    return mark_p.bind(x, tag=str(tag))


# ----------------------------------------------------------------------------------
# Primitive classes
# ----------------------------------------------------------------------------------

_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "checkpoint", "remat", "remat2"}
_MATMULS = {"dot_general", "conv_general_dilated"}
# Elementwise primitives (output shape = broadcast of the operands' shapes).
_AFFINE = {"add", "sub", "neg", "mul", "div", "convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision"}
_ACTIVATION_PRIMS = {"logistic", "tanh", "erf", "erfc", "max", "min", "select_n", "clamp", "abs"}
_ENTIRE = {  # defined on the whole real line: Gaussian expectations exist
    "exp", "exp2", "expm1", "sin", "cos", "square", "integer_pow", "sign", "round", "floor", "ceil",
    "atan", "asinh", "erf_inv_never",
} | _ACTIVATION_PRIMS
_PARTIAL = {"log", "log1p", "sqrt", "rsqrt", "cbrt", "pow", "tan", "acos", "asin", "acosh", "atanh", "erf_inv", "lgamma", "digamma"}
_COMPARE = {"gt", "ge", "lt", "le", "eq", "ne", "is_finite", "not", "and", "or", "xor"}
ELEMENTWISE = _AFFINE | _ENTIRE | _PARTIAL | _COMPARE


def _is_float(aval) -> bool:
    return hasattr(aval, "dtype") and np.issubdtype(np.dtype(aval.dtype), np.inexact)


# ----------------------------------------------------------------------------------
# The flat program
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ref:
    """An operand: a variable of the flat program (``var``) or a constant value (``const``)."""

    var: Optional[int] = None
    const: Any = None

    @property
    def is_var(self) -> bool:
        return self.var is not None


@dataclasses.dataclass
class Op:
    """One primitive application of the flat program."""

    prim: Any
    params: dict
    ins: tuple  # of Ref
    outs: tuple  # of int (variable ids)
    out_avals: tuple
    path: tuple  # eqn indices through nested calls
    name_stack: str
    source: str
    frames: tuple  # (file, line, function) of the traceback, innermost first (jax internals included)
    calls: tuple  # (path, name) of the enclosing calls, innermost first

    @property
    def name(self) -> str:
        return self.prim.name


@dataclasses.dataclass(frozen=True)
class Site:
    """A place where noise can go.

    Attributes:
      index: position among ALL candidate sites of the function (stable: does not
        depend on which sites are selected); noise keys fold it in.
      kind: ``"activation"`` (output of an elementwise nonlinearity), ``"matmul"``
        (output of ``dot_general``/``conv_general_dilated``) or ``"marked"``
        (:func:`mark`, e.g. :func:`noisejax.layers.NoiseSite`).
      primitive: the activation's name (``relu``, ``gelu``, ``logistic``, ``tanh``...),
        ``dot_general``/``conv_general_dilated``, or the mark's tag.
      module: the Flax module path from JAX's name stack (``"CNN/Dense_0"``; ``""``
        outside modules).
      source: the user's source line (``file.py:12:8 (CNN.__call__)``).
      shape, dtype: of the noisy array.
    """

    index: int
    kind: str
    primitive: str
    module: str
    source: str
    shape: tuple
    dtype: str
    path: tuple = dataclasses.field(repr=False, default=())
    var: int = dataclasses.field(repr=False, default=-1)

    def __str__(self) -> str:
        mod = f" in {self.module}" if self.module else ""
        return f"#{self.index} {self.kind} {self.primitive}{mod} {self.dtype}{list(self.shape)} at {self.source}"


@dataclasses.dataclass
class Cluster:
    """One activation: an elementwise function of one data value ``root``; ops ``members`` (flat indices)."""

    root: int  # variable id
    members: tuple  # flat op indices, in program order
    outputs: tuple  # variable ids used outside the cluster
    name: str  # activation name for Site.primitive


@dataclasses.dataclass
class Program:
    """A flattened jaxpr with its analysis."""

    n_in: int  # variables 0 .. n_in-1 are the flat inputs
    ops: list
    outs: tuple  # of Ref
    in_avals: tuple
    out_avals: tuple
    param_only: set  # variable ids that depend on parameter inputs and constants only
    clusters: list
    cluster_of: dict  # flat op index -> cluster index
    sites: tuple  # of Site, in index order
    consumers: dict  # variable id -> list of flat op indices
    last_use: dict  # variable id -> index of the last op that consumes it (outputs: not counted)
    out_vars: frozenset = frozenset()  # variable ids returned by the program

    def site_at(self, var: int) -> Optional[Site]:
        return self._site_by_var.get(var)

    def __post_init__(self):
        self._site_by_var = {s.var: s for s in self.sites}
        self.producer = {o: k for k, op in enumerate(self.ops) for o in op.outs}  # variable id -> flat op index


def _source(eqn) -> tuple[str, tuple]:
    from jax._src import source_info_util as siu

    try:
        src = siu.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - private API drift
        src = "unknown"
    frames = ()
    try:
        tb = eqn.source_info.traceback
        if tb is not None:
            frames = tuple((f.file_name, f.line_num, f.function_name) for f in tb.frames)
    except Exception:  # pragma: no cover
        frames = ()
    return src, frames


def _known(src: str) -> bool:
    return bool(src) and src != "unknown" and "<unknown" not in src


def _sub_jaxpr(eqn) -> Optional[tuple[Any, list]]:
    """``(jaxpr, consts)`` of a call eqn whose sub-jaxpr takes exactly the eqn's operands, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, _xcore.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, list(sub.consts)
        elif isinstance(sub, _xcore.Jaxpr):
            jaxpr, consts = sub, []
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


class _Flattener:
    def __init__(self):
        self.ops: list[Op] = []
        self.ids = itertools.count()
        self.avals: dict[int, Any] = {}
        self.call_outs: dict[tuple, tuple] = {}

    def new_var(self, aval) -> int:
        i = next(self.ids)
        self.avals[i] = aval
        return i

    def run(self, jaxpr, consts, in_refs, path, name_stack, calls, call_source=""):
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = Ref(const=c)
        for v, r in zip(jaxpr.invars, in_refs):
            env[v] = r

        def read(atom):
            if isinstance(atom, _xcore.Literal):
                return Ref(const=atom.val)
            return env[atom]

        for i, eqn in enumerate(jaxpr.eqns):
            ins = tuple(read(a) for a in eqn.invars)
            ns = str(eqn.source_info.name_stack)
            full_ns = "/".join(p for p in (name_stack, ns) if p)
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                nm = eqn.params.get("name")
                inner = ((path + (i,), nm if isinstance(nm, str) else eqn.primitive.name),) + calls
                csrc = _source(eqn)[0]
                csrc = csrc if _known(csrc) else call_source
                outs = self.run(sub[0], sub[1], ins, path + (i,), full_ns, inner, csrc)
                self.call_outs[path + (i,)] = outs
                for v, r in zip(eqn.outvars, outs):
                    env[v] = r
                continue
            src, fns = _source(eqn)
            if not _known(src):
                src = call_source or src
            out_ids = tuple(self.new_var(v.aval) for v in eqn.outvars)
            for v, o in zip(eqn.outvars, out_ids):
                env[v] = Ref(var=o)
            self.ops.append(
                Op(eqn.primitive, dict(eqn.params), ins, out_ids, tuple(v.aval for v in eqn.outvars), path + (i,), full_ns, src, fns, calls)
            )
        return tuple(read(a) for a in jaxpr.outvars)


def flatten(closed_jaxpr, *, param_inputs: Sequence[bool] = ()) -> Program:
    """Flatten ``closed_jaxpr`` (from :func:`jax.make_jaxpr`) and analyse it.

    ``param_inputs[i]`` says whether flat input ``i`` is a parameter (not data):
    parameter-only values may appear inside elementwise clusters as operands.
    """
    fl = _Flattener()
    jaxpr = closed_jaxpr.jaxpr
    in_refs = tuple(Ref(var=fl.new_var(v.aval)) for v in jaxpr.invars)
    outs = fl.run(jaxpr, list(closed_jaxpr.consts), in_refs, (), "", ())
    n_in = len(in_refs)
    ops = fl.ops
    params = [bool(p) for p in param_inputs] + [False] * (n_in - len(param_inputs))

    # parameter-only variables: every var operand is parameter-only (constants are)
    param_only = {i for i in range(n_in) if params[i]}
    for op in ops:
        if op.prim.name in _CALLS or op.prim is mark_p:
            continue
        if all((not r.is_var) or r.var in param_only for r in op.ins):
            param_only.update(op.outs)  # constants, and functions of parameters and constants only

    consumers: dict[int, list] = {}
    last_use: dict[int, int] = {}
    for k, op in enumerate(ops):
        for r in op.ins:
            if r.is_var:
                consumers.setdefault(r.var, []).append(k)
                last_use[r.var] = k

    clusters, cluster_of = _clusters(ops, param_only, consumers, {r.var for r in outs if r.is_var}, fl.avals, fl.call_outs)
    sites = _sites(ops, clusters, fl.avals)
    return Program(
        n_in, ops, outs, tuple(v.aval for v in jaxpr.invars), tuple(v.aval for v in jaxpr.outvars),
        param_only, clusters, cluster_of, sites, consumers, last_use, frozenset(r.var for r in outs if r.is_var),
    )


# ----------------------------------------------------------------------------------
# Elementwise clusters
# ----------------------------------------------------------------------------------


def _is_elementwise(op: Op) -> bool:
    return op.prim.name in ELEMENTWISE and len(op.outs) == 1 and hasattr(op.out_avals[0], "shape")


_NN_FUNCTIONS = {
    "relu", "relu6", "gelu", "silu", "swish", "softplus", "sigmoid", "tanh", "elu", "celu", "selu", "leaky_relu",
    "hard_tanh", "hard_sigmoid", "hard_silu", "hard_swish", "mish", "log_sigmoid", "soft_sign", "sparse_plus",
    "squareplus",
}


def _clusters(ops, param_only, consumers, out_vars, avals, call_outs):
    """Activation instances: groups of elementwise ops forming ONE activation of one data root.

    An instance is (1) the ops inside a call named like a ``jax.nn`` activation
    (``custom_jvp_call[name=relu]``, ``jit[name=silu]``...), (2) the ops whose
    traceback passes through such a function that JAX inlined (``jax.nn.gelu``),
    split into connected components, or (3) one bare activation primitive
    (``tanh``, ``logistic``, ``erf``, ``max(x, 0)``...).  It becomes a cluster when
    all its ops are elementwise and its only data operand from outside is one
    value (the root) of the output's shape.
    """
    groups: dict = {}
    for k, op in enumerate(ops):
        if not op.outs:
            continue
        key = None
        for cpath, nm in reversed(op.calls):  # the outermost named activation call
            if nm in _NN_FUNCTIONS:
                key = ("call", cpath)
                break
        if key is None:
            for j, (fname, _, fn) in enumerate(op.frames):
                if fn in _NN_FUNCTIONS and f"{os.sep}jax{os.sep}" in fname:
                    key = ("inline", fn) + tuple(op.frames[j + 1 :])
                    break
        if key is None and _bare_activation(op):
            key = ("bare", k)
        if key is not None and not all(o in param_only for o in op.outs):
            groups.setdefault(key, []).append(k)
    found = []
    for key, members in groups.items():
        for comp in _components(ops, members):
            c = _make_cluster(ops, comp, param_only, consumers, out_vars, avals, key, call_outs)
            if c is not None:
                found.append(c)
    found.sort(key=lambda c: c.members[0])
    cluster_of = {k: i for i, c in enumerate(found) for k in c.members}
    return found, cluster_of


def _bare_activation(op: Op) -> bool:
    """``tanh``/``logistic``/``erf``... on data, or ``max``/``min`` with a finite constant (``relu``, clipping)."""
    if not _is_elementwise(op) or op.prim.name not in _ACTIVATION_PRIMS:
        return False
    if op.prim.name in ("max", "min"):
        consts = [r.const for r in op.ins if not r.is_var]
        return len(consts) == 1 and np.ndim(consts[0]) == 0 and bool(np.isfinite(consts[0]))
    return op.prim.name not in ("select_n", "abs")


def _components(ops, members):
    """Split ops into groups connected by data flow among themselves."""
    parent = {k: k for k in members}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    producer = {o: k for k in members for o in ops[k].outs}
    for k in members:
        for r in ops[k].ins:
            if r.is_var and r.var in producer:
                parent[find(k)] = find(producer[r.var])
    comps: dict = {}
    for k in members:
        comps.setdefault(find(k), []).append(k)
    return [sorted(c) for c in comps.values()]


def _make_cluster(ops, members, param_only, consumers, out_vars, avals, key, call_outs):
    if not all(_is_elementwise(ops[k]) for k in members):
        return None
    mset = set(members)
    member_vars = {o for k in members for o in ops[k].outs}
    data_in = {r.var for k in members for r in ops[k].ins if r.is_var and r.var not in param_only and r.var not in member_vars}
    if len(data_in) != 1:
        return None
    root = data_in.pop()
    shape = avals[root].shape
    if key[0] == "call":
        outputs = tuple(r.var for r in call_outs.get(key[1], ()) if r.is_var and r.var in member_vars)
    else:
        outputs = tuple(v for v in sorted(member_vars) if v in out_vars or any(c not in mset for c in consumers.get(v, ())))
    if not outputs or any(avals[o].shape != shape for k in members for o in ops[k].outs):
        return None
    if not all(_is_float(avals[v]) for v in outputs) or not _is_float(avals[root]):
        return None
    if key[0] == "call":
        name = next(nm for p, nm in ops[members[0]].calls if p == key[1])
    elif key[0] == "inline":
        name = key[1]
    else:
        op = ops[members[0]]
        name = {"logistic": "sigmoid"}.get(op.prim.name, op.prim.name)
        if op.prim.name in ("max", "min"):
            c = next(r.const for r in op.ins if not r.is_var)
            name = "relu" if (op.prim.name == "max" and float(c) == 0.0) else "clip"
    return Cluster(root, tuple(members), outputs, name)


# ----------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------


def _sites(ops, clusters, avals) -> tuple:
    producer = {}
    for k, op in enumerate(ops):
        for o in op.outs:
            producer[o] = k
    found = []  # (op index, kind, primitive, var)
    for c in clusters:
        for v in c.outputs:
            if _is_float(avals[v]):
                found.append((producer[v], "activation", c.name, v))
    for k, op in enumerate(ops):
        if op.prim.name in _MATMULS and _is_float(op.out_avals[0]):
            found.append((k, "matmul", op.prim.name, op.outs[0]))
        elif op.prim is mark_p:
            found.append((k, "marked", op.params["tag"], op.outs[0]))
    found.sort(key=lambda t: (t[0], t[3]))
    sites = []
    for i, (k, kind, prim, v) in enumerate(found):
        op = ops[k]
        aval = avals[v]
        sites.append(Site(i, kind, prim, _module(op.name_stack), op.source, tuple(aval.shape), str(aval.dtype), op.path, v))
    return tuple(sites)


def _module(name_stack: str) -> str:
    parts = [p for p in name_stack.split("/") if p and not p.startswith(("jvp(", "transpose(", "vmap(", "pjit(", "jit("))]
    return "/".join(parts)


# ----------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------

SiteSelection = Any  # str | sequence of str | Callable[[Site], bool]


def select(sites: Sequence[Site], selection: SiteSelection) -> tuple:
    """The sites matched by ``selection``: ``"activations"``, ``"matmuls"``, ``"marked"``,
    ``"all"``, a sequence of those, or a predicate ``Site -> bool``."""
    kinds = {"activations": "activation", "matmuls": "matmul", "marked": "marked"}
    if callable(selection) and not isinstance(selection, str):
        pred = selection
    else:
        names = (selection,) if isinstance(selection, str) else tuple(selection)
        if not names:
            raise InvalidArgumentError("sites is empty; expected 'activations', 'matmuls', 'marked', 'all' or a predicate")
        wanted = set()
        for n in names:
            if n == "all":
                wanted |= set(kinds.values())
            elif n in kinds:
                wanted.add(kinds[n])
            else:
                raise InvalidArgumentError(
                    f"sites={n!r} is not a site kind; expected 'activations', 'matmuls', 'marked', 'all', "
                    "a sequence of them or a predicate over noisejax.Site"
                )
        pred = lambda s: s.kind in wanted  # noqa: E731
    return tuple(s for s in sites if pred(s))


def describe(sites: Sequence[Site]) -> str:
    """A readable table of sites (index, kind, primitive, module, shape, source)."""
    rows = [("#", "kind", "primitive", "module", "shape", "source")]
    for s in sites:
        rows.append((str(s.index), s.kind, s.primitive, s.module or "-", "x".join(map(str, s.shape)) or "()", s.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def user_line(op: Op) -> str:
    """The user's source line of ``op`` (for error messages)."""
    return op.source if op.source and op.source != "unknown" else "<unknown source>"
