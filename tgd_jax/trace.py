"""The channel graph of any JAX function of a variables pytree, read off its jaxpr.

:func:`trace_topology` traces ``apply_fn(variables, *args, **kwargs)`` with
``jax.make_jaxpr`` and runs an abstract interpretation over the equations: every value
carries the axis that holds its channels and, per channel, the id of the map it carries
(:mod:`tgd_jax.graph`). Each primitive has ONE rule (:data:`RULES`, in the manner of
Torch-Pruning's DepGraph), and a primitive without a rule that touches a tracked channel
axis is refused, never guessed:

* **layers**: ``conv_general_dilated`` with a kernel that is a variable (a conv; a
  transposed conv when the input is dilated) and ``dot_general`` contracting the channel
  axis with a kernel variable (a dense layer) make new maps and record which maps their
  input channels read;
* **channel-wise ops** keep the ids: elementwise arithmetic and activations, dtype casts,
  BatchNorm's arithmetic, pooling and reductions over other axes, padding, slicing,
  transposes, reshapes that leave the channel axis alone, up/down-sampling, dropout;
* **concatenation** on the channel axis appends the ids of each operand occurrence;
* **elementwise ops between two tracked values** tie their channels: a residual add makes
  the channels of every conv writing the stream one map (union-find);
* **per-channel variables** (bias, scale, statistics, gate masks) are attached where they
  meet a tracked channel axis elementwise;
* **grouped and depthwise convs** (``feature_group_count > 1``) are layers whose output
  channel ``o`` reads only its group's input channels (:attr:`tgd_jax.graph.Layer.groups`);
* **refused**: channel mixing other than a layer (a reshape that
  merges the channel axis, a reduction over it, attention-style contractions of two
  activations), a broadcast of one channel to many, a kernel used twice, a layer stack
  under ``scan``/``while``, and any unknown primitive on a tracked channel axis. The
  error names the primitive, the layers whose maps are involved and the model's name
  stack.

Sub-jaxprs (``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``,
``closed_call``, ``cond``) are followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.graph import PARAMS, ChannelGraph, Layer, key_name

__all__ = ["trace_topology", "analyze", "Analysis", "TraceError", "RULES", "register_rule",
           "leaf_paths"]


class TraceError(UsageError):
    """The tracer met a construct whose channel wiring it cannot state exactly (a
    :class:`~tgd_jax.errors.UsageError`, so a ``ValueError`` too).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(params, x):  # a reduction over the channels: refused
      ...     y = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
      ...                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ...     return y.sum(axis=-1)
      >>> try:
      ...     trace_topology(apply, {"w": jnp.ones((3, 3, 1, 4))}, jnp.ones((1, 8, 8, 1)))
      ... except TraceError as error:
      ...     print(str(error)[:75])
      trace_topology: a reduction over the channel axis mixes the channels (primi
    """


@dataclasses.dataclass
class _Value:
    """What the interpretation knows of one jaxpr value.

    ``axis``/``ids``: the channel axis and the map id of each channel on it (``-1``: not
    a layer's output). ``axis=None`` with one id: a single channel whose axis was
    squeezed away. ``sub``: the channel axis split in two by a reshape (GroupNorm's
    ``(..., C) -> (..., G, C / G)``): the channels run over ``axis`` (groups) and ``sub``
    (= ``axis + 1``, within a group), and ``ids`` has shape ``(G, C / G)``; only
    elementwise ops, reductions, reshapes and transposes accept such a value. ``leaves``: for a
    value computed from variables only, per variable leaf, the leaf axis behind each
    value axis (None: broadcast) and whether indices along it are the leaf's own (False
    after a slice or reversal).
    """

    shape: tuple[int, ...]
    axis: int | None = None
    ids: np.ndarray | None = None
    leaves: tuple[tuple[int, tuple[int | None, ...], tuple[bool, ...]], ...] = ()
    opaque: frozenset[int] = frozenset()  # leaves mixed in by ops the tracer cannot follow
    sub: int | None = None

    @property
    def tracked(self) -> bool:
        return self.ids is not None and bool(np.any(self.ids >= 0))

    @property
    def is_variable(self) -> bool:
        return bool(self.leaves) or bool(self.opaque)


def _plain(shape: Sequence[int]) -> _Value:
    return _Value(tuple(int(d) for d in shape))


class _Interpreter:
    def __init__(self, leaf_names: list[str], collections: list[str],
                 shapes: list[tuple[int, ...]]) -> None:
        self.leaf_names = leaf_names
        self.collections = collections
        self.shapes = shapes
        self.parent: list[int] = []  # union-find over map ids
        self.producer: list[str] = []  # the layer that made each id ("" for a tie)
        self.tied: dict[int, tuple[int, int]] = {}  # tie id -> the two ids it combines
        self._sources: dict[int, frozenset[int]] = {}
        self.layers: list[dict[str, Any]] = []
        self.kernel_layer: dict[int, str] = {}
        self.attached: dict[int, tuple[int, dict[int, int]]] = {}  # leaf -> (axis, idx -> id)
        self.used_opaque: set[int] = set()
        # The walk as a tree, one node per equation visited (for tgd_jax.autogate):
        # {"gate": (axis, ids) or None, "children": [node lists of its sub-jaxprs]}.
        self._stack: list[list[dict[str, Any]]] = []
        self.gate_point: tuple[int | None, np.ndarray] | None = None
        self.name_stacks: list[str] = []  # of the equations whose sub-jaxprs are walked

    # --- union-find -------------------------------------------------------------------
    def new_ids(self, n: int, layer: str) -> np.ndarray:
        start = len(self.parent)
        self.parent += list(range(start, start + n))
        self.producer += [layer] * n
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        if a < 0:
            return b
        if b < 0:
            return a
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)

    def tie(self, a: int, b: int) -> int:
        """The id of a channel that combines channels ``a`` and ``b`` elementwise (a
        residual add): one decision with both (union), and a fresh id whose
        :meth:`sources` are theirs, so that who reads WHICH writer stays exact."""
        if a < 0 or a == b:
            return b
        if b < 0:
            return a
        (tied,) = self.new_ids(1, "")
        self.tied[int(tied)] = (a, b)
        self.union(int(tied), a)
        self.union(int(tied), b)
        return int(tied)

    def sources(self, i: int) -> set[int]:
        """The layer-made ids whose values flow into channel id ``i`` (itself if a layer
        made it; the writers of a tie)."""
        i = int(i)
        if i not in self._sources:  # memoised: ids never change once made, and ties of
            # ties share sources (walking them again would be exponential in the depth)
            if i in self.tied:
                a, b = self.tied[i]
                self._sources[i] = frozenset(self.sources(a) | self.sources(b))
            else:
                self._sources[i] = frozenset({i} if i >= 0 else ())
        return set(self._sources[i])

    def layers_of(self, values: Sequence[_Value]) -> list[str]:
        names: dict[str, None] = {}
        for v in values:
            if v.ids is not None:
                for i in np.ravel(v.ids):
                    if i >= 0:
                        for j in sorted(self.sources(int(i))):
                            names[self.producer[j]] = None
            for leaf, _, _ in v.leaves:
                names[self.leaf_names[leaf]] = None
        return list(names)

    # --- the walk ------------------------------------------------------------------------
    def run(self, jaxpr: Any, consts: Sequence[_Value], args: Sequence[_Value]) -> list[_Value]:
        env: dict[Any, _Value] = {}

        def read(atom: Any) -> _Value:
            if isinstance(atom, jax.extend.core.Literal):
                return _plain(np.shape(atom.val))
            return env[atom]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        nodes: list[dict[str, Any]] = []
        parent = self._stack[-1] if self._stack else None
        self._stack.append(nodes)
        for eqn in jaxpr.eqns:
            node: dict[str, Any] = {"gate": None, "children": []}
            nodes.append(node)
            self.gate_point = None
            ins = [read(a) for a in eqn.invars]
            name = eqn.primitive.name
            rule = RULES.get(name)
            if rule is None:
                rule = _unknown
            self.name_stacks.append(str(eqn.source_info.name_stack))
            try:
                if rule not in _SPLIT_RULES and any(v.sub is not None for v in ins):
                    raise TraceError("the channel axis is split in groups (by a reshape) "
                                     "and this op has no rule for split channels")
                outs = rule(self, eqn, ins)
            except TraceError as error:
                if str(error).startswith("trace_topology:"):
                    raise
                stack = "/".join(s for s in self.name_stacks if s)
                stack = stack or "<top level>"
                layers = self.layers_of(ins)
                raise TraceError(
                    f"trace_topology: {error} (primitive '{name}' at '{stack}'; layers "
                    f"involved: {layers or 'none'})") from None
            self.name_stacks.pop()
            node["gate"] = self.gate_point
            self.gate_point = None
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        self._stack.pop()
        if parent is not None and parent:
            parent[-1]["children"].append(nodes)
        self.last_nodes = nodes
        return [read(a) for a in jaxpr.outvars]


# --- rules -------------------------------------------------------------------------------

Rule = Callable[[_Interpreter, Any, list[_Value]], list[_Value]]


def _out_shapes(eqn: Any) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in getattr(v.aval, "shape", ())) for v in eqn.outvars]


def _unknown(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    if any(v.tracked for v in ins):
        raise TraceError("no rule for this primitive, and it touches a tracked channel axis")
    if any(v.is_variable for v in ins):
        opaque = frozenset().union(*(_leaf_set(v) for v in ins))
        return [_Value(s, opaque=opaque) for s in _out_shapes(eqn)]
    return [_plain(s) for s in _out_shapes(eqn)]


def _leaf_set(v: _Value) -> frozenset[int]:
    return frozenset(leaf for leaf, _, _ in v.leaves) | v.opaque


def _elementwise(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    """Same-shape (or scalar) operands: channels at the same position are one map."""
    (shape,) = _out_shapes(eqn)
    acts = [v for v in ins if v.ids is not None]
    variables = [v for v in ins if v.is_variable and v.ids is None]
    for v in acts:  # operands of equal rank broadcast their size-1 axes
        if v.axis is not None and (len(v.shape) != len(shape) or any(
                v.shape[a] != shape[a] for a in (v.axis, v.sub) if a is not None)):
            if v.tracked:
                raise TraceError("one channel is broadcast to many channels (not per-channel)")
            acts = [a for a in acts if a is not v]
    axes = {(v.axis, v.sub) for v in acts}
    if len(axes) > 1:
        raise TraceError(f"operands carry channels on different axes {sorted(map(str, axes))}")
    if not acts:  # variables only (or plain values): combine the variable information
        leaves = tuple(leaf for v in variables for leaf in v.leaves)
        opaque = frozenset().union(*(v.opaque for v in variables)) if variables else frozenset()
        return [_Value(shape, leaves=leaves, opaque=opaque)]
    axis, sub = acts[0].axis, acts[0].sub
    ids = acts[0].ids.copy()
    for v in acts[1:]:
        if v.ids.shape != ids.shape:
            raise TraceError("operands carry different channel counts")
        ids = np.array([interp.tie(int(a), int(b)) for a, b in zip(
            ids.ravel(), v.ids.ravel(), strict=True)]).reshape(ids.shape)
    if sub is not None:  # split channels: only activations and shared constants meet here
        for v in variables:
            if any(len(la) == len(shape) and (la[axis] is not None or la[sub] is not None)
                   for _, la, _ in v.leaves) or v.opaque:
                raise TraceError("a variable meets channels split in groups")
        return [_Value(shape, axis=axis, ids=ids, sub=sub)]
    for v in variables:
        _attach(interp, v, axis, ids, shape)
    if axis is not None and any(interp.collections[leaf] == PARAMS and len(la) == len(shape)
                                and la[axis] is not None
                                for v in variables for leaf, la, _ in v.leaves):
        interp.gate_point = (axis, ids)  # a per-channel parameter acts here (bias, scale)
    return [_Value(shape, axis=axis, ids=ids)]


def _attach(interp: _Interpreter, v: _Value, axis: int | None, ids: np.ndarray,
            shape: tuple[int, ...]) -> None:
    """A variable value meets channels: each leaf indexed along the channel axis is
    attached to them; a leaf broadcast along it is shared by all channels (not attached)."""
    if axis is None:
        return
    if v.opaque and len(v.shape) == len(shape) and v.shape[axis] > 1:
        names = [interp.leaf_names[i] for i in sorted(v.opaque)]
        raise TraceError(f"variables {names} reach the channels through an op the tracer "
                         "cannot follow")
    for leaf, leaf_axes, exact in v.leaves:
        leaf_axis = leaf_axes[axis] if len(leaf_axes) == len(shape) else None
        if leaf_axis is None or (interp.shapes[leaf][leaf_axis] == 1 and len(ids) > 1):
            continue  # broadcast along the channel axis: one value for every channel
        if not exact[axis]:
            raise TraceError(f"variable '{interp.leaf_names[leaf]}' is sliced or reordered "
                             "along the channel axis before it meets the channels")
        known_axis, index = interp.attached.setdefault(leaf, (leaf_axis, {}))
        if known_axis != leaf_axis:
            raise TraceError(f"variable '{interp.leaf_names[leaf]}' meets channels along two "
                             "of its axes")
        for j, i in enumerate(ids):
            if i < 0:
                continue
            if j in index:
                index[j] = interp.union(index[j], int(i))
            else:
                index[j] = int(i)


def _variable_of(interp: _Interpreter, v: _Value, what: str) -> tuple[int, tuple, tuple]:
    if v.opaque or len(v.leaves) != 1:
        names = [interp.leaf_names[i] for i in sorted(_leaf_set(v))]
        raise TraceError(f"the {what} is not one variable taken as it is (from {names})")
    return v.leaves[0]


def _register_layer(interp: _Interpreter, eqn: Any, kernel: _Value, lhs: _Value,
                    lhs_axis: int, k_in: int, k_out: int, kind: str,
                    groups: int = 1) -> np.ndarray:
    leaf, leaf_axes, exact = _variable_of(interp, kernel, "kernel")
    name = interp.leaf_names[leaf]
    if interp.collections[leaf] != PARAMS:
        raise TraceError(f"the kernel '{name}' is not a trainable parameter")
    in_axis, out_axis = leaf_axes[k_in], leaf_axes[k_out]
    if in_axis is None or out_axis is None or not (exact[k_in] and exact[k_out]):
        raise TraceError(f"the kernel '{name}' is broadcast or reordered on a channel axis")
    if leaf in interp.kernel_layer:
        raise TraceError(f"the kernel '{name}' is used by two layers "
                         f"(first by '{interp.kernel_layer[leaf]}'); its channels would have "
                         "two decisions")
    path = name[:-len("/kernel")] if name.endswith("/kernel") else name
    interp.kernel_layer[leaf] = path
    c_in = kernel.shape[k_in] * groups  # a grouped kernel holds C_in / groups inputs
    in_ids = _read_channels(lhs, lhs_axis, c_in)
    out_ids = interp.new_ids(kernel.shape[k_out], path)
    interp.layers.append(dict(path=path, kernel=name, in_axis=in_axis, out_axis=out_axis,
                              kind=kind, in_ids=in_ids, out_ids=out_ids,
                              name=str(eqn.source_info.name_stack), groups=groups))
    return out_ids


def _read_channels(lhs: _Value, axis: int, c_in: int) -> np.ndarray:
    if lhs.ids is None:
        return np.full(c_in, -1)
    if lhs.axis is None:  # a squeezed single channel read as a one-channel input
        if c_in != 1:
            raise TraceError("a single squeezed channel is read as several channels")
        return lhs.ids.copy()
    if lhs.axis != axis:
        if not lhs.tracked:
            return np.full(c_in, -1)
        raise TraceError(f"the channels sit on axis {lhs.axis}, but the layer mixes axis {axis}")
    return lhs.ids.copy()


def _conv(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    lhs, rhs = ins
    (shape,) = _out_shapes(eqn)
    dn = eqn.params["dimension_numbers"]
    lhs_f, rhs_o, rhs_i, out_f = dn.lhs_spec[1], dn.rhs_spec[0], dn.rhs_spec[1], dn.out_spec[1]
    groups = eqn.params["feature_group_count"]
    if eqn.params["batch_group_count"] != 1:
        raise TraceError("batch-grouped convolutions are not supported")
    if rhs.ids is not None:
        raise TraceError("the conv's kernel is computed from activations")
    if not rhs.is_variable:  # a fixed filter (blur, box pooling): channel-wise if depthwise
        if lhs.tracked and groups != lhs.shape[lhs_f]:
            raise TraceError("a convolution with a constant kernel mixes the channels")
        out = _Value(shape)
        if lhs.ids is not None and lhs.axis == lhs_f:
            out = _Value(shape, axis=out_f, ids=lhs.ids.copy())
        return [out]
    # A grouped conv (depthwise: groups = C_in) is a layer whose output channel o reads
    # only its group's inputs: exact, recorded as Layer.groups.
    dilated = any(d != 1 for d in eqn.params["lhs_dilation"])
    ids = _register_layer(interp, eqn, rhs, lhs, lhs_f, rhs_i, rhs_o,
                          "conv_transpose" if dilated else "conv", groups=groups)
    interp.gate_point = (out_f, ids)
    return [_Value(shape, axis=out_f, ids=ids)]


def _dot_general(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    lhs, rhs = ins
    (shape,) = _out_shapes(eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    l_free = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    r_free = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]

    def out_axis(side: str, d: int) -> int:
        batch, free = (lb, l_free) if side == "l" else (rb, r_free)
        if d in batch:
            return batch.index(d)
        offset = len(lb) + (0 if side == "l" else len(l_free))
        return offset + free.index(d)

    for act, kern, side, a_c, k_c, k_free in ((lhs, rhs, "l", lc, rc, r_free),
                                               (rhs, lhs, "r", rc, lc, l_free)):
        if not kern.is_variable or kern.ids is not None or act.is_variable:
            continue
        if act.ids is not None and act.axis is not None and act.axis not in a_c:
            # the channels are not contracted: a weight on another axis, shared by all
            _mark_opaque(interp, kern)
            return [_Value(shape, axis=out_axis(side, act.axis), ids=act.ids.copy())]
        if len(a_c) == 1 and len(k_free) == 1 and not lb and _is_dense_kernel(interp, kern):
            ids = _register_layer(interp, eqn, kern, act, a_c[0], k_c[0], k_free[0], "dense")
            kernel_side = "r" if side == "l" else "l"
            interp.gate_point = (out_axis(kernel_side, k_free[0]), ids)
            return [_Value(shape, axis=out_axis(kernel_side, k_free[0]), ids=ids)]
        if act.tracked:
            raise TraceError("a contraction of the channel axis with a variable that is not "
                             "a dense layer's kernel")
        _mark_opaque(interp, kern)
        return [_plain(shape)]
    if lhs.tracked and rhs.tracked:
        raise TraceError("a product of two activations with channels (attention-style "
                         "channel mixing)")
    for act, side, contracted in ((lhs, "l", lc), (rhs, "r", rc)):
        if act.ids is not None and act.axis is not None:
            if act.axis in contracted:
                if act.tracked:
                    raise TraceError("the channel axis is contracted with a non-variable "
                                     "operand (channel mixing without a layer)")
                return [_plain(shape)]
            return [_Value(shape, axis=out_axis(side, act.axis), ids=act.ids.copy())]
    if lhs.is_variable or rhs.is_variable:
        return [_Value(shape, opaque=_leaf_set(lhs) | _leaf_set(rhs))]
    return [_plain(shape)]


def _is_dense_kernel(interp: _Interpreter, v: _Value) -> bool:
    if v.opaque or len(v.leaves) != 1:
        return False
    leaf = v.leaves[0][0]
    return interp.collections[leaf] == PARAMS and len(v.shape) == 2


def _mark_opaque(interp: _Interpreter, v: _Value) -> None:
    interp.used_opaque |= _leaf_set(v)


def _broadcast_in_dim(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    dims = tuple(eqn.params["broadcast_dimensions"])
    leaves = []
    for leaf, leaf_axes, exact in v.leaves:
        axes: list[int | None] = [None] * len(shape)
        ex = [True] * len(shape)
        for i, d in enumerate(dims):
            if v.shape[i] == shape[d]:
                axes[d], ex[d] = leaf_axes[i], exact[i]
        leaves.append((leaf, tuple(axes), tuple(ex)))
    out = _Value(shape, leaves=tuple(leaves), opaque=v.opaque)
    if v.ids is not None:
        if v.axis is None:
            if v.tracked and not (len(shape) and all(shape[d] == 1 for d in range(len(shape))
                                                     if d not in dims)):
                raise TraceError("a single channel is broadcast to many positions of a "
                                 "channel axis (not per-channel)")
            out.ids = v.ids.copy()
        else:
            new = dims[v.axis]
            if v.shape[v.axis] != shape[new]:
                if v.tracked:
                    raise TraceError("one channel is broadcast to many channels (not "
                                     "per-channel)")
                return [_Value(shape, leaves=out.leaves, opaque=out.opaque)]
            out.axis, out.ids = new, v.ids.copy()
    return [out]


def _reshape_map(old: tuple[int, ...], new: tuple[int, ...]) -> dict[int, int]:
    """Old axis -> new axis, for axes that keep their size and their place in the layout
    (only size-1 axes inserted or removed, or other axes split/merged around them)."""
    out = {}
    for i, size in enumerate(old):
        before = int(np.prod(old[:i]))
        for k, s in enumerate(new):
            if s == size and int(np.prod(new[:k])) == before:
                out[i] = k
                break
    return out


def _reshape(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    if eqn.params.get("dimensions") is not None:
        raise TraceError("reshape with a transposition")
    mapping = _reshape_map(v.shape, shape)
    # Size-1 axes prepended (as Linen reshapes a bias to (1, ..., 1, C) before adding it):
    # each old axis stays aligned with the end, as broadcasting aligns them. Without this a
    # one-channel layer's bias of shape (1,) lost its channel axis here.
    padded = (len(shape) >= len(v.shape)
              and tuple(shape[len(shape) - len(v.shape):]) == tuple(v.shape))
    leaves, opaque = [], set(v.opaque)
    for leaf, leaf_axes, exact in v.leaves:
        axes: list[int | None] = [None] * len(shape)
        ex = [True] * len(shape)
        ok = True
        for i, la in enumerate(leaf_axes):
            if v.shape[i] == 1:
                if padded:
                    k = len(shape) - len(v.shape) + i
                    axes[k], ex[k] = la, exact[i]
                continue
            if i not in mapping:
                ok = False
                break
            axes[mapping[i]], ex[mapping[i]] = la, exact[i]
        if ok:
            leaves.append((leaf, tuple(axes), tuple(ex)))
        else:
            opaque.add(leaf)
    out = _Value(shape, leaves=tuple(leaves), opaque=frozenset(opaque))
    if v.ids is not None and v.axis is not None and (v.sub is not None or (
            v.tracked and v.axis not in mapping and v.shape[v.axis] > 1)):
        out.axis, out.sub, out.ids = _regroup(v, shape)
    elif v.ids is not None:
        if v.axis is None:
            out.ids = v.ids.copy()
        elif v.axis in mapping:
            out.axis, out.ids = mapping[v.axis], v.ids.copy()
        elif v.shape[v.axis] == 1:
            out.ids = v.ids.copy()  # the single channel's axis is squeezed away
        elif v.tracked:
            raise TraceError(f"reshape {v.shape} -> {shape} merges or splits the channel axis")
        else:
            out.ids = None
    return [out]


def _regroup(v: _Value, shape: tuple[int, ...]) -> tuple[int, int | None, np.ndarray]:
    """A reshape that splits or merges the channel axis, when each element keeps one
    channel: ``(..., C, ...) -> (..., G, C / G, ...)`` (a split: GroupNorm's groups),
    its inverse, and the channel axis merged with the axes after it (``jnp.repeat`` of
    per-group values along the channels: position ``c * S + j`` is channel ``c``).
    Anything else (a flatten that puts other axes before the channels) is refused."""
    before = int(np.prod(v.shape[:v.axis]))
    lead = [k for k in range(len(shape) + 1) if int(np.prod(shape[:k])) == before]
    if v.sub is None:
        c = v.shape[v.axis]
        for k in lead:
            if (k + 1 < len(shape) and shape[k] * shape[k + 1] == c and shape[k] > 1
                    and shape[k + 1] > 1 and tuple(shape[k + 2:]) == tuple(v.shape[v.axis + 1:])):
                return k, k + 1, v.ids.reshape(shape[k], shape[k + 1])
        for k in lead:
            for end in range(v.axis + 2, len(v.shape) + 1):  # axes axis..end-1 merged
                rest = int(np.prod(v.shape[v.axis + 1:end]))
                if (k < len(shape) and shape[k] == c * rest
                        and tuple(shape[k + 1:]) == tuple(v.shape[end:])):
                    return k, None, np.repeat(v.ids, rest)
    else:
        g, s = v.ids.shape
        for k in lead:
            if k < len(shape) and shape[k] == g * s and (
                    tuple(shape[k + 1:]) == tuple(v.shape[v.sub + 1:])):
                return k, None, v.ids.reshape(-1)
    raise TraceError(f"reshape {v.shape} -> {shape} merges or splits the channel axis")


def _squeeze(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    dims = sorted(int(d) % max(1, len(v.shape)) for d in eqn.params["dimensions"])
    keep = [i for i in range(len(v.shape)) if i not in dims]
    leaves = tuple((leaf, tuple(la[i] for i in keep), tuple(ex[i] for i in keep))
                   for leaf, la, ex in v.leaves)
    out = _Value(shape, leaves=leaves, opaque=v.opaque)
    if v.ids is not None:
        out.ids = v.ids.copy()
        out.axis = None if v.axis is None or v.axis in dims else keep.index(v.axis)
    return [out]


def _transpose(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    perm = tuple(eqn.params["permutation"])
    leaves = tuple((leaf, tuple(la[p] for p in perm), tuple(ex[p] for p in perm))
                   for leaf, la, ex in v.leaves)
    out = _Value(shape, leaves=leaves, opaque=v.opaque)
    if v.sub is not None:  # split channels: the two axes may swap (a channel shuffle)
        a, b = perm.index(v.axis), perm.index(v.sub)
        if abs(a - b) != 1:
            raise TraceError("a transpose separates the two halves of a split channel axis")
        out.axis, out.sub, out.ids = min(a, b), max(a, b), (v.ids if a < b else v.ids.T).copy()
    elif v.ids is not None:
        out.ids = v.ids.copy()
        out.axis = None if v.axis is None else perm.index(v.axis)
    return [out]


def _reduce(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    shapes = _out_shapes(eqn)
    axes = tuple(int(a) for a in eqn.params["axes"])
    if v.ids is not None and v.axis is not None and v.axis in axes and v.tracked:
        raise TraceError("a reduction over the channel axis mixes the channels")
    keep = [i for i in range(len(v.shape)) if i not in axes]
    if v.sub is not None:
        return _reduce_split(interp, v, shapes, axes, keep)
    leaves = tuple((leaf, tuple(la[i] for i in keep), tuple(ex[i] for i in keep))
                   for leaf, la, ex in v.leaves)
    outs = []
    for shape in shapes:
        out = _Value(shape, leaves=leaves, opaque=v.opaque)
        if v.ids is not None and (v.axis is None or v.axis in keep):
            out.ids = v.ids.copy()
            out.axis = None if v.axis is None else keep.index(v.axis)
        outs.append(out)
    return outs


def _tie_all(interp: _Interpreter, ids: list[int]) -> int:
    """One id tying all of ``ids``, built as a balanced tree: :meth:`_Interpreter.sources`
    recurses once per level, so a chain over a group of hundreds of channels would not do."""
    while len(ids) > 1:
        ids = [interp.tie(ids[i], ids[i + 1]) if i + 1 < len(ids) else ids[i]
               for i in range(0, len(ids), 2)]
    return ids[0] if ids else -1


def _reduce_split(interp: _Interpreter, v: _Value, shapes: list[tuple[int, ...]],
                  axes: tuple[int, ...], keep: list[int]) -> list[_Value]:
    """A reduction of channels split in groups (GroupNorm's statistics). Over the
    within-group axis it mixes the channels of each group: one tie per group, which puts
    the group's channels in one decision; the groups stay apart."""
    if v.sub in axes:
        ids = np.array([_tie_all(interp, [int(i) for i in row]) for row in v.ids])
        axis, sub = keep.index(v.axis), None
    else:
        ids, axis, sub = v.ids.copy(), keep.index(v.axis), keep.index(v.sub)
    return [_Value(shape, axis=axis, ids=ids.copy(), sub=sub) for shape in shapes]


def _cumulative(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    if v.tracked and v.axis == eqn.params["axis"]:
        raise TraceError("a cumulative op along the channel axis mixes the channels")
    return [dataclasses.replace(v, shape=_out_shapes(eqn)[0])]


def _reduce_window(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    window = eqn.params["window_dimensions"]
    if v.tracked and v.axis is not None and window[v.axis] != 1:
        raise TraceError("a pooling window spans the channel axis")
    shapes = _out_shapes(eqn)
    return [dataclasses.replace(v, shape=s, leaves=(), opaque=_leaf_set(v)) for s in shapes]


def _concatenate(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    (shape,) = _out_shapes(eqn)
    dim = int(eqn.params["dimension"])
    acts = [v for v in ins if v.ids is not None]
    if any(v.is_variable for v in ins):
        if acts:
            raise TraceError("variables are concatenated with activations")
        return [_Value(shape, opaque=frozenset().union(*(_leaf_set(v) for v in ins)))]
    if not acts:
        return [_plain(shape)]
    axes = {v.axis for v in acts if v.tracked}
    if len(axes) > 1:
        raise TraceError("operands carry channels on different axes")
    axis = axes.pop() if axes else acts[0].axis
    if axis is None:
        raise TraceError("a squeezed single channel is concatenated")
    if axis == dim:  # channels side by side: each occurrence keeps its ids
        ids = np.concatenate([v.ids if v.ids is not None and v.axis == axis
                              else np.full(v.shape[dim], -1) for v in ins])
        return [_Value(shape, axis=axis, ids=ids)]
    ids = np.full(shape[axis], -1)  # concatenated along another axis: channel j of each
    for v in acts:
        if v.axis != axis:
            continue
        ids = np.array([interp.tie(int(a), int(b)) for a, b in zip(ids, v.ids, strict=True)])
    return [_Value(shape, axis=axis, ids=ids)]


def _slice(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    return [_sliced(v, shape, lambda a, ids: ids[start[a]:limit[a]:strides[a]])]


def _sliced(v: _Value, shape: tuple[int, ...], take: Callable[[int, np.ndarray], np.ndarray]
            ) -> _Value:
    leaves = tuple((leaf, la, tuple(e and v.shape[i] == shape[i] for i, e in enumerate(ex)))
                   for leaf, la, ex in v.leaves)
    out = _Value(shape, leaves=leaves, opaque=v.opaque)
    if v.ids is not None:
        out.axis = v.axis
        out.ids = v.ids.copy() if v.axis is None else take(v.axis, v.ids)
    return out


def _tile(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    """``jnp.tile``: the channel axis repeated lists each channel once per repeat, as
    ``concatenate([x, x])`` does; repeating other axes (upsampling by tiling) leaves the
    channels as they are."""
    (shape,) = _out_shapes(eqn)
    reps = tuple(int(r) for r in eqn.params["reps"])
    return [_sliced(ins[0], shape, lambda a, ids: np.tile(ids, reps[a]))]


def _dynamic_slice(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    (shape,) = _out_shapes(eqn)
    starts = eqn.invars[1:]

    def take(a: int, ids: np.ndarray) -> np.ndarray:
        if shape[a] == len(ids):
            return ids.copy()
        atom = starts[a]
        if not isinstance(atom, jax.extend.core.Literal):
            raise TraceError("a slice of the channel axis at a position known only at run time")
        s = int(np.clip(int(atom.val), 0, len(ids) - shape[a]))
        return ids[s:s + shape[a]]

    return [_sliced(v, shape, take)]


def _split(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    axis = int(eqn.params["axis"])
    bounds = np.cumsum([0, *eqn.params["sizes"]])
    return [_sliced(v, shape, lambda a, ids, lo=lo, hi=hi: ids[lo:hi] if a == axis else ids)
            for shape, lo, hi in zip(_out_shapes(eqn), bounds[:-1], bounds[1:], strict=True)]


def _pad(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v, value = ins
    if value.tracked:
        raise TraceError("padding with a value that has channels")
    (shape,) = _out_shapes(eqn)
    config = eqn.params["padding_config"]

    def take(a: int, ids: np.ndarray) -> np.ndarray:
        lo, hi, interior = config[a]
        if (lo, hi, interior) == (0, 0, 0):
            return ids.copy()
        if lo < 0 or hi < 0:
            raise TraceError("negative padding (cropping) of the channel axis")
        grown = []
        for j, i in enumerate(ids):
            grown.append(i)
            if j < len(ids) - 1:
                grown += [-1] * interior
        return np.array([-1] * lo + grown + [-1] * hi)

    return [_sliced(v, shape, take)]


def _rev(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    v = ins[0]
    dims = tuple(eqn.params["dimensions"])
    leaves = tuple((leaf, la, tuple(e and i not in dims for i, e in enumerate(ex)))
                   for leaf, la, ex in v.leaves)
    out = _Value(v.shape, leaves=leaves, opaque=v.opaque)
    if v.ids is not None:
        out.axis = v.axis
        out.ids = v.ids[::-1].copy() if v.axis in dims else v.ids.copy()
    return [out]


def _passthrough(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    return [dataclasses.replace(v, shape=s) for v, s in zip(ins, _out_shapes(eqn), strict=False)]


def _random(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    if any(v.tracked for v in ins):
        raise TraceError("random numbers drawn from values with channels")
    return [_plain(s) for s in _out_shapes(eqn)]


def _sub_jaxpr(key: str) -> Rule:
    def rule(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
        closed = eqn.params[key]
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = [_plain(np.shape(c)) for c in getattr(closed, "consts", ())]
        if eqn.primitive.name == "custom_jvp_call" and _func_name(jaxpr) == "tgd_gate":
            return _gate(interp, eqn, ins)
        return interp.run(jaxpr, consts, ins)
    return rule


def _func_name(jaxpr: Any) -> str:
    info = getattr(jaxpr, "debug_info", None)
    return str(getattr(info, "func_name", "") or "")


def _gate(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    """``tgd_gate(x, mask)``: identity on x; the mask variable belongs to x's channels."""
    x, mask = ins
    if x.ids is not None and mask.is_variable:
        pad = len(x.shape) - len(mask.shape)  # the mask broadcasts against x's last axes
        aligned = _Value(x.shape, opaque=mask.opaque, leaves=tuple(
            (leaf, (None,) * pad + la, (True,) * pad + ex) for leaf, la, ex in mask.leaves))
        _attach(interp, aligned, x.axis, x.ids, x.shape)
    return [x]


def _custom_vjp(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    closed = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    jaxpr = getattr(closed, "jaxpr", closed)
    consts = [_plain(np.shape(c)) for c in getattr(closed, "consts", ())]
    return interp.run(jaxpr, consts, ins[len(ins) - len(jaxpr.invars):])


def _cond(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    index, *operands = ins
    if index.tracked:
        raise TraceError("a branch chosen by values with channels")
    results = [interp.run(b.jaxpr, [_plain(np.shape(c)) for c in b.consts], operands)
               for b in eqn.params["branches"]]
    outs = []
    for values in zip(*results, strict=True):
        merged = values[0]
        for v in values[1:]:
            if ((v.ids is None) != (merged.ids is None) or (v.axis, v.sub) != (merged.axis,
                                                                             merged.sub)
                    or (v.ids is not None and v.ids.shape != merged.ids.shape)):
                if v.tracked or merged.tracked:
                    raise TraceError("the branches of a cond return channels differently")
                continue
            if v.ids is not None:  # (split channels: ids of shape (G, C / G), tied alike)
                merged = dataclasses.replace(merged, ids=np.array(
                    [interp.tie(int(a), int(b)) for a, b in zip(
                        merged.ids.ravel(), v.ids.ravel(), strict=True)]).reshape(
                            merged.ids.shape))
        outs.append(merged)
    return outs


def _loop(interp: _Interpreter, eqn: Any, ins: list[_Value]) -> list[_Value]:
    if any(v.tracked or v.is_variable for v in ins):
        raise TraceError("channels or variables enter a loop (a layer stack under scan/while "
                         "is not supported: unroll it)")
    return [_plain(s) for s in _out_shapes(eqn)]


_ELEMENTWISE = (
    "add add_any sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log "
    "log1p expm1 tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh "
    "sqrt rsqrt cbrt square integer_pow abs erf erfc erf_inv lgamma digamma select_n clamp "
    "eq ne lt le gt ge and or not xor convert_element_type reduce_precision nextafter "
    "real imag conj copy copy_p stop_gradient shift_left shift_right_logical "
    "shift_right_arithmetic population_count clz polygamma igamma igammac bessel_i0e "
    "bessel_i1e regularized_incomplete_beta random_gamma_grad square"
).split()

#: primitive name -> rule (one per op type). Names differ between JAX versions
#: (``pjit``/``jit``); both are listed.
RULES: dict[str, Rule] = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "expand_dims": _reshape,
    "transpose": _transpose,
    **dict.fromkeys(["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor", "argmax", "argmin"], _reduce),
    **dict.fromkeys(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"], _cumulative),
    **dict.fromkeys(["reduce_window_sum", "reduce_window_max", "reduce_window_min",
                     "reduce_window"], _reduce_window),
    "concatenate": _concatenate,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "split": _split,
    "pad": _pad,
    "rev": _rev,
    "tile": _tile,
    **dict.fromkeys(["sharding_constraint", "device_put", "optimization_barrier",
                     "mesh_cast", "reshard"], _passthrough),
    **dict.fromkeys(["random_bits", "random_seed", "random_wrap", "random_unwrap",
                     "random_fold_in", "random_split", "threefry2x32", "iota"], _random),
    "pjit": _sub_jaxpr("jaxpr"),
    "jit": _sub_jaxpr("jaxpr"),
    "closed_call": _sub_jaxpr("call_jaxpr"),
    "core_call": _sub_jaxpr("call_jaxpr"),
    "remat": _sub_jaxpr("jaxpr"),
    "remat2": _sub_jaxpr("jaxpr"),  # jax.checkpoint / nn.remat in jax 0.10 and 0.12
    "checkpoint": _sub_jaxpr("jaxpr"),
    "custom_jvp_call": _sub_jaxpr("call_jaxpr"),
    "custom_vjp_call": _custom_vjp,
    "custom_vjp_call_jaxpr": _custom_vjp,
    "cond": _cond,
    "while": _loop,
    "scan": _loop,
}


# Rules that understand channels split in groups (_Value.sub); any other refuses them.
_SPLIT_RULES = (_elementwise, _reshape, _reduce, _transpose)


def register_rule(primitive: str, rule: str | Rule, *, replace: bool = False) -> None:
    """Teaches the tracer (and the paper-mode gates of :mod:`tgd_jax.autogate`) a primitive.

    Like Torch-Pruning's ``register_customized_layer``, it changes the process-wide
    :data:`RULES`: call it once, at import time of the code that defines the primitive.

    Args:
      primitive: the primitive's name as it appears in the jaxpr (``eqn.primitive.name``;
        ``jax.make_jaxpr(fn)(x)`` shows it).
      rule: the NAME of a primitive whose rule applies as it is (the usual case: a custom
        elementwise activation behaves like ``"tanh"``, a custom op that keeps every
        channel where it is like ``"sharding_constraint"``, a sub-jaxpr call like
        ``"closed_call"``), or a function with the built-in rules' signature
        ``rule(interp, eqn, ins) -> outs``: ``eqn`` the jaxpr equation, ``ins`` what the
        interpretation knows of each input (``shape``; ``axis``, the channel axis or None;
        ``ids``, the map id per channel or None), ``outs`` the same for each output.
        A rule that cannot state a case exactly raises :class:`TraceError`.
      replace: allow replacing a primitive that already has a rule (built-in or
        registered); without it that is refused, so that a typo cannot silently
        change how convs or adds are read.

    Raises:
      TraceError: ``rule`` names a primitive without a rule, is neither a name nor a
        callable, or ``primitive`` has a rule and ``replace`` is False.

    Example:
      >>> register_rule("my_softsign", "tanh")  # an elementwise activation, per channel
      >>> RULES["my_softsign"] is RULES["tanh"]
      True
      >>> del RULES["my_softsign"]
    """
    if isinstance(rule, str):
        if rule not in RULES:
            raise TraceError(f"register_rule: '{rule}' has no rule to reuse (known: "
                             f"{len(RULES)} primitives, e.g. 'tanh', 'sharding_constraint')")
        rule = RULES[rule]
    elif not callable(rule):
        raise TraceError(f"register_rule: rule must be a primitive name or a function "
                         f"(interp, eqn, ins) -> outs, got {type(rule).__name__}")
    if primitive in RULES and not replace:
        raise TraceError(f"register_rule: '{primitive}' already has a rule; pass "
                         "replace=True to change it")
    RULES[primitive] = rule


# --- entry point -------------------------------------------------------------------------

def leaf_paths(variables: Any) -> tuple[list[str], list[str], list[Any]]:
    """``(paths, collections, leaves)`` of a variables pytree, in flattening order.

    A Linen variables dict ``{"params": ..., "batch_stats": ...}`` takes the collection
    from the first key (the path is the rest). An NNX state (leaves in ``nnx.Variable`` s) uses the
    variable type as the collection (``Param`` -> ``params``, ``BatchStat`` ->
    ``batch_stats``). Any other pytree counts as params. Integer keys (NNX lists) are
    written as numbers: ``'blocks/0/conv/kernel'``.

    Example:
      >>> import jax.numpy as jnp
      >>> leaf_paths({"params": {"c": {"kernel": jnp.ones((1, 1, 1, 2))}}})[:2]
      (['c/kernel'], ['params'])
    """
    nnx_variable = _nnx_variable_type()
    flat, _ = jax.tree_util.tree_flatten_with_path(
        variables, is_leaf=lambda x: nnx_variable is not None and isinstance(x, nnx_variable))
    linen = (_is_mapping(variables) and PARAMS in variables
             and _is_mapping(variables[PARAMS]))
    names: list[str] = []
    collections: list[str] = []
    leaves: list[Any] = []
    for path, leaf in flat:
        keys = [key_name(k) for k in path]
        keys = [k for k in keys if k is not None]
        if nnx_variable is not None and isinstance(leaf, nnx_variable):
            collection = _nnx_collection(leaf)
            leaf = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
            name = "/".join(keys)
        elif linen:
            collection, name = keys[0], "/".join(keys[1:])
        else:
            collection, name = PARAMS, "/".join(keys)
        names.append(name)
        collections.append(collection)
        leaves.append(leaf)
    return names, collections, leaves


def _is_mapping(x: Any) -> bool:
    from collections.abc import Mapping

    return isinstance(x, Mapping)


def _nnx_variable_type() -> type | None:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx here
        return None
    return nnx.Variable


def _nnx_collection(variable: Any) -> str:
    from flax import nnx

    if isinstance(variable, nnx.Param):
        return PARAMS
    if isinstance(variable, nnx.BatchStat):
        return "batch_stats"
    return type(variable).__name__.lower()


def trace_topology(apply_fn: Callable[..., Any], variables: Any, *args: Any,
                   **kwargs: Any) -> ChannelGraph:
    """The :class:`~tgd_jax.graph.ChannelGraph` of ``apply_fn(variables, *args, **kwargs)``.

    Args:
      apply_fn: any function of a variables pytree and inputs, e.g. ``model.apply`` for
        Linen, ``lambda state, x: nnx.merge(graphdef, state)(x)`` for NNX, or a plain
        function calling ``jax.lax.conv_general_dilated`` on a params dict. Trace the
        inference call (``train=False``): every output of the function counts as the
        network's output.
      variables: its variables (Linen ``{"params": ..., "batch_stats": ...}``, an NNX
        ``State``, or a params pytree); only shapes and dtypes are used.
      args, kwargs: example inputs (shapes matter, values do not) and static options.

    Returns:
      The graph, with layers in the order the function runs them. Layer paths are the
      kernel's params path without its final ``'/kernel'``.

    Raises:
      TraceError: a construct without an exact rule (module docstring), naming the
        primitive, the layers involved and the name stack; or a training-mode call
        (``mutable=``), whose updated statistics would count as outputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         a = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
      ...         b = nn.Conv(4, (3, 3), name="b")(a) + a        # a residual add
      ...         return nn.Conv(1, (3, 3), name="c")(jnp.concatenate([a, b], -1))
      >>> x = jnp.zeros((1, 8, 8, 1))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> graph = trace_topology(Net().apply, variables, x)
      >>> graph.readers["a"], graph.groups
      ((('b', 0), ('c', 0), ('c', 4)), (('a', 'b'),))
    """
    if kwargs.get("mutable"):
        # a training-mode call returns the updated collections too, and every output counts
        # as the network's: the maps feeding the statistics would all look like outputs
        raise TraceError(f"trace_topology: mutable={kwargs['mutable']!r} makes the call "
                         "return its updated collections, which would count as network "
                         "outputs; trace the inference call (train=False, no mutable=)")
    analysis = analyze(apply_fn, variables, *args, **kwargs)
    return _build(analysis._interp, analysis.outputs, analysis.names, analysis.collections)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One call's jaxpr read by the rules: what :func:`trace_topology` builds the graph
    from and what :func:`tgd_jax.autogate.gated` places its gates by (one walk, one
    source of truth for both).

    Attributes:
      jaxpr: the call's closed jaxpr, a function of ``(flat variable leaves, *args)``.
      out_shape: the call's output shapes (``jax.make_jaxpr(..., return_shape=True)``).
      names, collections: per variable leaf, its path and collection
        (:func:`leaf_paths`).
      layers: per layer in the order the call runs them, ``{"path", "kernel", "out_ids",
        ...}``: the ids of the maps its output channels write.
      nodes: the walk as a tree, one node per equation of ``jaxpr``: ``{"gate": (axis,
        ids) or None, "children": [node lists of its sub-jaxprs]}``; ``gate`` marks where
        a per-channel parameter meets channel ids (a paper-mode gate goes there).
      outputs: what the walk knows of each output value (internal).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(params, x):  # two convs added: one decision for their maps
      ...     conv = lambda w: jax.lax.conv_general_dilated(
      ...         x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ...     return conv(params["a"]) + conv(params["b"])
      >>> params = {"a": jnp.ones((1, 1, 1, 2)), "b": jnp.ones((1, 1, 1, 2))}
      >>> a = analyze(apply, params, jnp.ones((1, 2, 2, 1)))
      >>> [a.root(i) for layer in a.layers for i in layer["out_ids"]]
      [0, 1, 0, 1]
    """

    jaxpr: Any
    out_shape: Any
    names: list[str]
    collections: list[str]
    layers: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    outputs: list[_Value]
    _interp: _Interpreter

    def root(self, map_id: int) -> int:
        """The representative of ``map_id``'s decision group (the ids tied to it by adds,
        concatenated reads or GroupNorm share one root)."""
        return self._interp.find(int(map_id))


def analyze(apply_fn: Callable[..., Any], variables: Any, *args: Any,
            **kwargs: Any) -> Analysis:
    """Reads ``apply_fn(variables, *args, **kwargs)`` with the rules (:data:`RULES`).

    Raises:
      TraceError: as :func:`trace_topology`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(params, x):
      ...     return jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
      ...                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> a = analyze(apply, {"w": jnp.ones((3, 3, 1, 2))}, jnp.ones((1, 4, 4, 1)))
      >>> [(layer["path"], len(layer["out_ids"])) for layer in a.layers]
      [('w', 2)]
    """
    names, collections, leaves = leaf_paths(variables)
    structs = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.float32))
               for x in leaves]
    treedef = jax.tree.structure(variables)
    if treedef.num_leaves != len(leaves):
        raise TraceError(f"trace_topology: the variables have {treedef.num_leaves} array "
                         f"leaves but {len(leaves)} named ones")

    def fn(flat: list[Any], *inputs: Any) -> Any:
        return apply_fn(jax.tree.unflatten(treedef, flat), *inputs, **kwargs)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(structs, *args)
    interp = _Interpreter(names, collections, [tuple(np.shape(x)) for x in leaves])
    variable_values = [_Value(tuple(np.shape(x)),
                              leaves=((i, tuple(range(np.ndim(x))), (True,) * np.ndim(x)),))
                       for i, x in enumerate(leaves)]
    arg_values = [_plain(np.shape(x)) for x in jax.tree.leaves(args)]
    consts = [_plain(np.shape(c)) for c in closed.consts]
    outs = interp.run(closed.jaxpr, consts, variable_values + arg_values)
    return Analysis(jaxpr=closed, out_shape=out_shape, names=names, collections=collections,
                    layers=interp.layers, nodes=interp.last_nodes, outputs=outs,
                    _interp=interp)


def _build(interp: _Interpreter, outs: list[_Value], names: list[str],
           collections: list[str]) -> ChannelGraph:
    if not interp.layers:
        raise TraceError("trace_topology: the function has no conv or dense layer whose "
                         "kernel is a variable")
    roots: dict[int, int] = {}

    def canon(i: int) -> int:
        if i < 0:
            return -1
        r = interp.find(int(i))
        return roots.setdefault(r, len(roots))

    layers = []
    for entry in interp.layers:
        out_maps = tuple(canon(i) for i in entry["out_ids"])
        layers.append(entry | {"out_maps": out_maps})
    made = {int(i): (e["path"], c) for e in interp.layers for c, i in enumerate(e["out_ids"])}

    def sources(i: int) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(made[j] for j in interp.sources(int(i)))) if i >= 0 else ()

    built = [Layer(path=e["path"], kernel=e["kernel"], in_axis=e["in_axis"],
                   out_axis=e["out_axis"], kind=e["kind"],
                   in_maps=tuple(canon(i) for i in e["in_ids"]), out_maps=e["out_maps"],
                   name=e["name"], groups=e["groups"],
                   in_sources=tuple(sources(i) for i in e["in_ids"])) for e in layers]
    outputs = frozenset(canon(i) for v in outs if v.ids is not None
                        for i in np.ravel(v.ids) if i >= 0)  # (split channels too)
    leaves = {}
    for leaf, (axis, index) in interp.attached.items():
        size = interp.shapes[leaf][axis]
        maps = tuple(canon(index[j]) if j in index else -1 for j in range(size))
        leaves[f"{collections[leaf]}/{names[leaf]}"] = (int(axis), maps)
    kernels = {interp.leaf_names[i] for i in interp.kernel_layer}
    other = tuple(f"{c}/{n}" for n, c in zip(names, collections, strict=True)
                  if not (c == PARAMS and n in kernels) and f"{c}/{n}" not in leaves)
    return ChannelGraph(layers=tuple(built), leaves=leaves, outputs=outputs, other=other)
