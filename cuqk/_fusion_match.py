"""Finding per-head RMSNorm + RoPE sites in a post-grad FX graph, for ``cuqk._fusion``.

:func:`find_site` starts at an ``rsqrt`` or ``_fused_rms_norm`` node and returns the
:class:`Site` it heads (the norm, the RoPE output, the cos/sin columns, the nodes that fusing
makes dead), None when no RoPE-like computation follows it, or raises :class:`NoMatch` with the
reason a candidate cannot be fused. See ``cuqk._fusion`` for the method.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .qk_norm_rope import ACTIVATION_DTYPES, HEAD_DIMS

aten, prims = torch.ops.aten, torch.ops.prims
CAST = prims.convert_element_type.default
GATHERS = {aten.index.Tensor, aten.index_select.default, aten.embedding.default}
_IDENTITIES = {CAST, aten.clone.default, aten.alias.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_PERMUTES = {aten.permute.default, aten.transpose.int}
_CACHE_DTYPES = tuple(getattr(torch, name) for name in ACTIVATION_DTYPES)
_ROPE_SEARCH_LIMIT = 256  # nodes evaluated after one norm; a RoPE takes about 15
# RoPE before the norm: ancestors of the norm input searched for the RoPE input (Llama 4's is 6
# nodes up), how many of them (with the norm's last dim) are tried, and nodes evaluated for each.
_ROPE_FIRST_ANCESTORS = 32
_ROPE_FIRST_CANDIDATES = 6
_ROPE_FIRST_LIMIT = 64


def meta_val(node):
    return node.meta["val"]


def meta_shape(node):
    return tuple(meta_val(node).shape)


def _is_one(size):
    return statically_known_true(size == 1)


def _same(a, b):
    return statically_known_true(a == b)


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def is_call(node, targets):
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _strip_casts(node):
    while is_call(node, {CAST}):
        node = node.args[0]
    return node


def origin(node):
    """The module the node came from (``self_attn.q_norm``), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        for prefix in ("L['self'].", "L['self']"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        if path:
            return f"{path} ({node.name})"
    return node.name


class NoMatch(Exception):
    """A candidate that cannot be fused; the message is the reason for the report."""


# ----------------------------------------------------------------------------- the norm


class _Norm(NamedTuple):
    x: torch.fx.Node  # norm input [*tokens, heads, head_dim], before any float32 cast
    y: torch.fx.Node  # norm output
    nodes: tuple  # the norm's own nodes, from the cast of x to y
    eps: float | torch.fx.Node
    weight: torch.fx.Node | None
    weight_nodes: tuple  # casts and the 1 + w between the weight and its multiply
    kind: str  # "rms" or "gemma"


def match_norm(node):
    """The RMSNorm at ``node`` (an rsqrt or a ``_fused_rms_norm``); None if it is not one;
    NoMatch for a norm over more than the last dim."""
    if node.target is aten._fused_rms_norm.default:
        return _match_fused_norm(node)
    rsqrt = node
    add = rsqrt.args[0]
    if not is_call(add, {aten.add.Tensor, aten.add.Scalar}):
        return None
    mean, eps = add.args[:2]
    if not is_call(mean, {aten.mean.dim}):
        mean, eps = eps, mean
    if not is_call(mean, {aten.mean.dim}):
        return None
    square = mean.args[0]
    if not (is_call(square, {aten.pow.Tensor_Scalar}) and square.args[1] == 2
            or is_call(square, {aten.mul.Tensor}) and square.args[0] is square.args[1]):
        return None
    xf = square.args[0]
    scaled = next((u for u in rsqrt.users
                   if is_call(u, {aten.mul.Tensor}) and set(u.args[:2]) == {xf, rsqrt}), None)
    if scaled is None:
        return None
    ndim = len(meta_shape(xf))
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if [_dim(d, ndim) for d in mean.args[1]] != [ndim - 1] or not keepdim:
        raise NoMatch(f"norm over dims {list(mean.args[1])} of a {ndim}-d tensor, not over "
                      "the last dim (head_dim)")
    x = _strip_casts(xf)
    casts, node = [], xf
    while node is not x:  # every cast from x to the dtype the norm computes in
        casts.append(node)
        node = node.args[0]
    nodes = [*reversed(casts), square, mean, add, rsqrt, scaled]
    return _follow_weight(x, scaled, nodes, _eps(eps), None)


def _eps(eps):
    # An eps that is not a number (torch.compile(dynamic=True) makes float constants graph
    # inputs) is kept as its node, and refused if a RoPE follows.
    return float(eps) if isinstance(eps, (int, float)) else _strip_casts(eps)


def _match_fused_norm(node):
    """``aten._fused_rms_norm``: what ``F.rms_norm`` calls; Inductor keeps it (as a fallback
    kernel) where the device has a fused kernel rather than decomposing it."""
    x, normalized_shape, weight, eps = (list(node.args) + [None, None])[:4]
    if len(normalized_shape) != 1:
        raise NoMatch(f"norm over the last {len(normalized_shape)} dims, not over head_dim")
    y = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
    if y is None:
        return None
    if eps is None:  # F.rms_norm's default for float16/bfloat16/float32 inputs
        eps = torch.finfo(torch.float32).eps
    nodes = [node, *node.users]  # both outputs: a used rstd keeps the norm
    if weight is not None:
        return _Norm(x, y, tuple(nodes), _eps(eps), weight, (), "rms")
    return _follow_weight(x, y, nodes, _eps(eps), None)


def _follow_weight(x, y, nodes, eps, weight):
    """The norm's end: past casts and one multiply by its weight (``w`` or ``1 + w``)."""
    weight_nodes, kind = (), "rms"
    while len(y.users) == 1:
        user = next(iter(y.users))
        if is_call(user, {CAST}):
            y = user
        elif weight is None and is_call(user, {aten.mul.Tensor}):
            other = user.args[1] if user.args[0] is y else user.args[0]
            found = _norm_weight(other, meta_shape(x)[-1])
            if found is None:
                break
            weight, weight_nodes, kind = found
            y = user
        else:
            break
        nodes.append(y)
    return _Norm(x, y, tuple(nodes), eps, weight, weight_nodes, kind)


def _norm_weight(node, head_dim):
    """``(w, nodes, "rms")`` for a multiply by ``w``, ``(w, nodes, "gemma")`` for ``1 + w``."""
    if not isinstance(node, torch.fx.Node) or not isinstance(meta_val(node), torch.Tensor):
        return None
    nodes, kind = [], "rms"
    while is_call(node, {CAST}):
        nodes.append(node)
        node = node.args[0]
    if is_call(node, {aten.add.Tensor, aten.add.Scalar}) and 1 in node.args[1:2]:
        nodes.append(node)
        kind = "gemma"
        node = node.args[0]
        while is_call(node, {CAST}):
            nodes.append(node)
            node = node.args[0]
    if len(meta_shape(node)) != 1 or not _same(meta_shape(node)[0], head_dim):
        return None
    return node, tuple(nodes), kind


# ----------------------------------------------------------------------------- RoPE, symbolically


class _Value(NamedTuple):
    """A tensor computed from ``y``. ``lead``: per leading dim, the non-unit leading dims of
    ``y`` merged into it (``()`` for a unit dim); ``folded``: leading dims of ``y`` merged into
    the last dim by a flat view; ``feat``: object array over the feature dims (head_dim and what
    it was split into), each element a tuple of terms ``(sign, index along head_dim, side)``
    with ``side`` None or a ``(source node, column)`` it was multiplied by."""

    lead: tuple
    folded: tuple
    feat: np.ndarray
    # view_as_complex of a value: the last feat axis (2) holds each element's (real, imag)
    is_complex: bool = False


class _Side(NamedTuple):
    """A multiplier not computed from ``y``: ``source`` node; ``lead``: per leading dim, the
    source dim it is (None where it is broadcast); ``feat``: object array of
    ``(source, column)`` over the feature dims."""

    source: torch.fx.Node
    lead: tuple
    feat: np.ndarray


def _terms_map(fn, *arrays):
    return np.frompyfunc(fn, len(arrays), 1)(*arrays)


def _negate(feat):
    return _terms_map(lambda terms: tuple((-s, i, c) for s, i, c in terms), feat)


def _slice_args(args):
    start, end, step = (list(args[2:]) + [None, None, 1])[:3]
    return slice(start, end, step)


def _split_bounds(split, width):
    size = split.args[1]
    sizes = size if isinstance(size, (list, tuple)) else \
        [min(size, width - s) for s in range(0, width, size)]
    return np.cumsum([0, *sizes])


def _split_dim(split):
    return split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)


class _Trace:
    """Symbolic evaluation of the ops after one norm's output ``y``."""

    def __init__(self, norm):
        self.norm = norm
        self.sizes = meta_shape(norm.y)[:-1]
        lead = tuple(() if _is_one(s) else (i,) for i, s in enumerate(self.sizes))
        feat = np.empty(meta_shape(norm.y)[-1], dtype=object)
        for i in range(len(feat)):
            feat[i] = ((1, i, None),)
        self.values = {norm.y: _Value(lead, (), feat)}
        self.links = {}  # side source -> {source dim: leading dim of y}
        self.side_nodes = set()
        self.first_stop = None
        # A norm is a RoPE candidate once its output is both moved along head_dim (slice,
        # split, cat, neg) and multiplied by another tensor; a gate or a projection is not.
        self.saw_side = self.saw_move = False

    def run(self, limit=_ROPE_SEARCH_LIMIT):
        """Evaluate forward from ``y`` in graph order; return the first RoPE-shaped node."""
        order = {n: i for i, n in enumerate(self.norm.y.graph.nodes)}
        frontier = sorted(self.norm.y.users, key=order.__getitem__)
        seen = set(frontier)
        while frontier and len(self.values) < limit:
            node = frontier.pop(0)
            try:
                value = self.step(node)
            except NoMatch as exc:
                self.first_stop = self.first_stop or f"{node.name}: {exc}"
                continue
            if value is None:
                self.first_stop = self.first_stop or f"{node.name} ({node.target})"
                continue
            self.values[node] = value
            if isinstance(value, _Value) and _rope_form(value, self) is not None:
                return node
            for user in node.users:
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
            frontier.sort(key=order.__getitem__)
        return None

    def value(self, arg):
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    def step(self, node):
        """The value of ``node`` from its inputs' values; None where the op is not followed."""
        if node.op != "call_function":
            return None
        target, args = node.target, node.args
        if target is operator.getitem:
            parts = self.value(args[0])
            return parts[args[1]] if isinstance(parts, list) else None
        if target in (aten.cat.default, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor):
            return self.combine(node)
        v = self.value(args[0])
        if not isinstance(v, _Value):
            return None
        if target is aten.view_as_complex.default:
            if v.is_complex or v.folded or v.feat.ndim < 2 or v.feat.shape[-1] != 2:
                return None
            self.saw_move = True
            return v._replace(is_complex=True)
        if v.is_complex:
            # Only the complex product by cos + i sin and the way back are followed.
            return v._replace(is_complex=False) if target is aten.view_as_real.default else None
        if target in _IDENTITIES:
            return v
        if target in _VIEWS:
            return _reshape(v, meta_shape(node), self.sizes)
        if v.folded:
            return None
        ndim = len(v.lead) + v.feat.ndim
        if target is aten.neg.default:
            self.saw_move = True
            return v._replace(feat=_negate(v.feat))
        if target in _PERMUTES:
            dims = _permutation(node, ndim)
            if dims[len(v.lead):] != list(range(len(v.lead), ndim)):
                return None
            return v._replace(lead=tuple(v.lead[d] for d in dims[:len(v.lead)]))
        if target is aten.unsqueeze.default:
            d = _dim(args[1], ndim + 1)
            if d <= len(v.lead):
                return v._replace(lead=v.lead[:d] + ((),) + v.lead[d:])
            return v._replace(feat=np.expand_dims(v.feat, d - len(v.lead)))
        if target is aten.slice.Tensor or target in _SPLITS:
            dim = args[1] if target is aten.slice.Tensor else _split_dim(node)
            axis = _dim(dim, ndim) - len(v.lead)
            if axis < 0:
                return None
            self.saw_move = True
            if target is aten.slice.Tensor:
                index = [slice(None)] * v.feat.ndim
                index[axis] = _slice_args(args)
                return v._replace(feat=v.feat[tuple(index)])
            bounds = _split_bounds(node, v.feat.shape[axis])
            return [v._replace(feat=np.take(v.feat, range(a, b), axis=axis))
                    for a, b in zip(bounds[:-1], bounds[1:])]
        return None

    def combine(self, node):
        target, args = node.target, node.args
        if target is aten.cat.default:
            parts = [self.value(a) for a in args[0]]
            if any(p is None or p.folded or p.is_complex or p.lead != parts[0].lead
                   for p in parts):
                return None
            ndim = len(parts[0].lead) + parts[0].feat.ndim
            axis = _dim(args[1] if len(args) > 1 else 0, ndim) - len(parts[0].lead)
            if axis < 0:
                return None
            self.saw_move = True
            return parts[0]._replace(feat=np.concatenate([p.feat for p in parts], axis=axis))
        a, b = self.value(args[0]), self.value(args[1])
        if target is aten.mul.Tensor:
            if (a is None) == (b is None):
                return None
            v, other = (a, args[1]) if a is not None else (b, args[0])
            if isinstance(other, (int, float)):
                return {1: v, -1: v._replace(feat=_negate(v.feat))}.get(other)
            return self.multiply_complex(v, other) if v.is_complex else self.multiply(v, other)
        if (a is None or b is None or a.is_complex or b.is_complex or a.lead != b.lead
                or a.folded or b.folded
                or a.feat.shape != b.feat.shape or node.kwargs.get("alpha", 1) != 1):
            return None
        feat_b = _negate(b.feat) if target is aten.sub.Tensor else b.feat
        return a._replace(feat=_terms_map(operator.add, a.feat, feat_b))

    def multiply(self, v, node):
        """``v * node`` where ``node`` is not computed from ``y`` (cos or sin)."""
        found = self._columns(v, node, v.feat.shape)
        if found is None or meta_val(found[1].source).is_complex():
            return None
        feat = _terms_map(_times, v.feat, found[0])
        return None if any(t is None for t in feat.flat) else v._replace(feat=feat)

    def multiply_complex(self, v, node):
        """Complex ``v * node``, ``node`` a complex ``cos + i sin`` not computed from ``y``
        (Llama 4's ``freqs_cis``). Column j of ``node`` is read as cos column j and sin column
        ``width + j``: the columns of ``[real | imag]``, which is what the fused call gets."""
        found = self._columns(v, node, v.feat.shape[:-1])
        if found is None or not meta_val(found[1].source).is_complex():
            return None
        cos, side = found
        width = meta_shape(side.source)[-1]
        sin = _terms_map(lambda column: (column[0], column[1] + width), cos)
        re, im = v.feat[..., 0], v.feat[..., 1]
        products = [_terms_map(_times, re, cos), _terms_map(_times, _negate(im), sin),
                    _terms_map(_times, re, sin), _terms_map(_times, im, cos)]
        if any(t is None for part in products for t in part.flat):
            return None
        new_re = _terms_map(operator.add, products[0], products[1])
        new_im = _terms_map(operator.add, products[2], products[3])
        return v._replace(feat=np.stack([new_re, new_im], axis=-1))

    def _columns(self, v, node, feat_shape):
        """``(columns, side)``: the ``(source, column)`` that multiplies each feature element
        and the multiplier's _Side, or None; records which leading dims of ``y`` it runs
        along."""
        self.saw_side = True
        side = self.side(node)
        if (side is None or v.folded or side.feat.ndim != len(feat_shape)
                or len(side.lead) > len(v.lead)):
            return None
        try:
            columns = np.broadcast_to(side.feat, feat_shape)
        except ValueError:
            return None
        offset = len(v.lead) - len(side.lead)
        links = self.links.setdefault(side.source, {})
        for position, ids in enumerate(v.lead):
            source_dim = side.lead[position - offset] if position >= offset else None
            if source_dim is None:
                continue
            if len(ids) != 1:
                return None
            if links.setdefault(source_dim, ids[0]) != ids[0]:
                raise NoMatch(f"cos/sin ({side.source.name}) meet the tokens in two layouts")
        return columns, side

    def side(self, node):
        """The _Side of a multiplier, followed back through layout ops to a source tensor."""
        chain = []
        while True:
            if is_call(node, _SIDE_OPS):
                chain.append(node)
                node = node.args[0]
            elif is_call(node, {operator.getitem}) and is_call(node.args[0], _SPLITS):
                chain += [node, node.args[0]]
                node = node.args[0].args[0]
            else:
                break
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        side = _fresh_side(node)
        for op in reversed(chain):
            if op.target not in _SPLITS:
                side = _side_step(side, op) or _fresh_side(op)
        if side.source in self.values or any(n in self.values for n in chain):
            raise NoMatch(f"{side.source.name}, computed from the normed heads, multiplies them")
        self.side_nodes.update(chain)
        return side


def _times(terms, column):
    """Terms of ``y`` times one side column; None if a term was multiplied already."""
    if terms is None or any(c is not None for _, _, c in terms):
        return None
    return tuple((s, i, column) for s, i, _ in terms)


_SIDE_OPS = {aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor, *_PERMUTES,
             *_IDENTITIES}


def _permutation(node, ndim):
    """The dims of a permute, or of a transpose as a permute."""
    if node.target is aten.permute.default:
        return [_dim(d, ndim) for d in node.args[1]]
    dims = list(range(ndim))
    a, b = (_dim(d, ndim) for d in node.args[1:3])
    dims[a], dims[b] = b, a
    return dims


def _fresh_side(node):
    shape = meta_shape(node)
    feat = np.empty(shape[-1], dtype=object)
    for c in range(shape[-1]):
        feat[c] = (node, c)
    return _Side(node, tuple(None if _is_one(s) else d for d, s in enumerate(shape[:-1])), feat)


def _side_step(side, node):
    """``side`` after the layout op ``node``; None where the op is not followed."""
    ndim = len(side.lead) + side.feat.ndim
    target, args = node.target, node.args
    if target in _IDENTITIES:
        return side if target is not CAST or meta_val(args[0]).dtype in _CACHE_DTYPES else None
    if target is aten.unsqueeze.default:
        d = _dim(args[1], ndim + 1)
        if d <= len(side.lead):
            return side._replace(lead=side.lead[:d] + (None,) + side.lead[d:])
        return side._replace(feat=np.expand_dims(side.feat, d - len(side.lead)))
    if target is aten.expand.default:
        shape = meta_shape(node)
        return side._replace(lead=(None,) * (len(shape) - ndim) + side.lead,
                             feat=np.broadcast_to(side.feat, shape[len(shape) - side.feat.ndim:]))
    if target in _PERMUTES:
        dims = _permutation(node, ndim)
        if dims[len(side.lead):] != list(range(len(side.lead), ndim)):
            return None
        return side._replace(lead=tuple(side.lead[d] for d in dims[:len(side.lead)]))
    # Slices of the columns: a slice, or a piece of a split.
    split = args[0] if target is operator.getitem else None
    dim = args[1] if split is None else _split_dim(split)
    if _dim(dim, ndim) != ndim - 1 or side.feat.ndim != 1:
        return None
    if split is None:
        return side._replace(feat=side.feat[_slice_args(args)])
    bounds = _split_bounds(split, len(side.feat))
    return side._replace(feat=side.feat[bounds[args[1]]:bounds[args[1] + 1]])


def _reshape(v, shape, sizes):
    """``v`` viewed as ``shape``, or None when the view mixes head_dim with other dims in a way
    the pass does not follow. Leading dims regroup freely; trailing leading dims may fold into
    the last dim (a flat ``[tokens, heads * head_dim]`` view) and unfold again."""
    atoms = [i for ids in v.lead for i in ids] + list(v.folded)
    lead, k = [], 0
    while atoms and k < len(shape):
        if _is_one(shape[k]):
            lead.append(())
            k += 1
            continue
        group, size = [], 1
        while atoms and not _same(size, shape[k]):
            group.append(atoms.pop(0))
            size = size * sizes[group[-1]]
        if _same(size, shape[k]):
            lead.append(tuple(group))
            k += 1
        elif k == len(shape) - 1 and _same(size * v.feat.size, shape[k]):
            return _Value(tuple(lead), tuple(group), v.feat.reshape(-1))
        else:
            return None
    rest = list(shape[k:])
    while len(rest) > 1 and _is_one(rest[0]):
        lead.append(())
        rest.pop(0)
    if atoms or not all(isinstance(s, int) for s in rest) or math.prod(rest) != v.feat.size:
        return None
    return _Value(tuple(lead), (), v.feat.reshape(rest))


class _Rope(NamedTuple):
    rotary_dim: int
    is_neox: bool
    cos: list  # per frequency, the (source, column) read as cos
    sin: list
    copies: bool  # a pair's second element reads a second copy of c and s (transformers)


def _rope_form(v, trace):
    """The _Rope that ``v`` computes from ``y``, or None."""
    feat = list(v.feat.flat)
    y = trace.values[trace.norm.y]
    if v.folded or v.feat.ndim != 1 or len(feat) != y.feat.size:
        return None
    if sorted(i for ids in v.lead for i in ids) != sorted(i for ids in y.lead for i in ids) \
            or any(len(ids) > 1 for ids in v.lead):
        return None
    rotary = 0
    while rotary < len(feat) and len(feat[rotary]) == 2:
        rotary += 1
    if rotary < 2 or rotary % 2 or any(feat[i] != ((1, i, None),)
                                       for i in range(rotary, len(feat))):
        return None
    half = rotary // 2
    for is_neox in (True, False):
        pairs = [(i, i + half) if is_neox else (2 * i, 2 * i + 1) for i in range(half)]
        found = _rope_pairs(feat, pairs)
        if found is not None:
            return _Rope(rotary, is_neox, *found)
    return None


def _rope_pairs(feat, pairs):
    """cos and sin columns if each pair (a, b) is ``(y[a]*c - y[b]*s, y[b]*c + y[a]*s)``."""
    cos, sin, copies = [], [], False
    for a, b in pairs:
        first = {(s, i): c for s, i, c in feat[a]}
        second = {(s, i): c for s, i, c in feat[b]}
        c1, s1, c2, s2 = first.get((1, a)), first.get((-1, b)), second.get((1, b)), \
            second.get((1, a))
        if None in (c1, s1, c2, s2) or c1 == s1:
            return None
        for one, two in ((c1, c2), (s1, s2)):
            if one != two:
                # transformers' layout: column i of cos serves element i, so the second element
                # of a pair reads its own copy, b - a columns on.
                if one[0] is not two[0] or two[1] - one[1] != b - a:
                    return None
                copies = True
        cos.append(c1)
        sin.append(s1)
    return cos, sin, copies


# ----------------------------------------------------------------------------- one candidate


class Site(NamedTuple):
    norm: _Norm  # with rope_first, x is the input of the RoPE, not of the norm
    out: torch.fx.Node  # the node the fused op replaces: the RoPE output, or the norm's
    out_lead: tuple  # its leading dims, as _Value.lead
    rope: _Rope
    region: tuple  # nodes the fused op makes dead, in graph order
    side_nodes: tuple  # layout ops on cos/sin and the weight, dead too unless shared
    tokens: tuple  # the dims of the norm input x that are tokens, in order
    heads: int  # the dim of x that is heads
    links: dict  # cos/sin source -> {its dim: the position in ``tokens`` it runs along}
    where: str
    rope_first: bool = False

    def key(self):
        """Sites with equal keys can share one call."""
        x, norm = meta_val(self.norm.x), self.norm
        columns = tuple((s.name, c) for s, c in self.rope.cos + self.rope.sin)
        links = tuple(sorted((s.name, tuple(sorted(m.items()))) for s, m in self.links.items()))
        weight = None if norm.weight is None else meta_val(norm.weight).dtype
        return (tuple(str(x.shape[d]) for d in self.tokens), x.shape[-1], x.dtype, x.device,
                self.rope.rotary_dim, self.rope.is_neox, columns, links, norm.eps, norm.kind,
                weight, self.rope_first)


def find_site(norm, where):
    """The fusable Site after ``norm``; None if nothing RoPE-like follows; NoMatch why not."""
    x = meta_val(norm.x)
    if any(is_call(u, _VIEWS) and len(meta_shape(u)) > x.dim() and meta_shape(u)[-1] != x.shape[-1]
           for u in norm.y.users):
        raise NoMatch(f"norm over the whole last dim ({x.shape[-1]}), which is then split "
                      "into heads: not a per-head norm")
    if not isinstance(x.shape[-1], int):
        raise NoMatch(f"head_dim {x.shape[-1]} is dynamic (torch.compile(dynamic=True)?); "
                      "the pass needs it constant")
    trace = _Trace(norm)
    out = trace.run()
    if out is None:
        if not (trace.saw_side and trace.saw_move):
            return None
        raise NoMatch(f"no RoPE recognised after the norm (first op not followed: "
                      f"{trace.first_stop})")
    return _site(norm, trace, out, out, where)


def find_rope_first_site(norm, where):
    """The fusable Site of a RoPE whose output is ``norm``'s input (Llama 4: RoPE, then a
    weight-free norm); None if the norm input is not a RoPE output; NoMatch why not.

    The RoPE input is searched among the near ancestors of the norm input that have its
    head_dim, farthest first (the projection's view, not a step inside the RoPE): the first
    whose symbolic evaluation reaches the norm input as a RoPE of it.
    """
    head_dim = meta_shape(norm.x)[-1]
    order = {n: i for i, n in enumerate(norm.x.graph.nodes)}
    seen, todo, candidates = {norm.x}, [norm.x], []
    while todo and len(seen) < _ROPE_FIRST_ANCESTORS:
        node = todo.pop(0)
        for arg in sorted(node.all_input_nodes, key=order.__getitem__, reverse=True):
            if arg in seen:
                continue
            seen.add(arg)
            todo.append(arg)
            value = arg.meta.get("val")
            if (isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_complex()
                    and _same(value.shape[-1], head_dim)):
                candidates.append(arg)
    for start in candidates[::-1][:_ROPE_FIRST_CANDIDATES]:
        trace = _Trace(_Norm(start, start, (), norm.eps, None, (), norm.kind))
        if trace.run(_ROPE_FIRST_LIMIT) is norm.x:
            # The heads as projected, before the float32 cast RoPE is often computed in.
            return _site(norm._replace(x=_strip_casts(start)), trace, norm.y, norm.x, where)
    return None


def _site(norm, trace, out, rope_out, where):
    """The Site once a RoPE is found: ``rope_out`` is the node whose value is the RoPE, ``out``
    the node the fused op replaces (``rope_out``, or the norm output when the norm follows the
    RoPE)."""
    x = meta_val(norm.x)
    if not isinstance(norm.eps, float):
        raise NoMatch(f"eps is a graph input ({norm.eps.name}), not a constant: "
                      "torch.compile(dynamic=True) does that to float constants; compile with "
                      "dynamic=None or set torch._dynamo.config.specialize_float = True")
    if x.dtype not in _CACHE_DTYPES:
        raise NoMatch(f"dtype {str(x.dtype).replace('torch.', '')} unsupported (cuqk runs "
                      f"{', '.join(ACTIVATION_DTYPES)})")
    if x.shape[-1] not in HEAD_DIMS:
        raise NoMatch(f"head_dim {x.shape[-1]} unsupported (multiples of 16 from 32 to 512)")
    if x.device.type not in ("cpu", "cuda"):
        raise NoMatch(f"device {x.device} unsupported")
    if norm.weight is not None and meta_val(norm.weight).dtype not in (x.dtype, torch.float32):
        raise NoMatch(f"norm weight dtype {meta_val(norm.weight).dtype} is neither {x.dtype} nor "
                      "float32")
    rope = _rope_form(trace.values[rope_out], trace)
    links = {s: trace.links.get(s, {}) for s in (rope.cos[0][0], rope.sin[0][0])}
    _check_cos_sin(rope, links)
    heads = _heads_dim(x, {d for dims in links.values() for d in dims.values()})
    tokens = tuple(d for d in range(x.dim() - 1) if d != heads)
    links = {s: {sd: tokens.index(d) for sd, d in dims.items()} for s, dims in links.items()}
    region = _region(trace, rope_out, norm, out)
    return Site(norm, out, trace.values[rope_out].lead, rope, region,
                tuple(trace.side_nodes) + norm.weight_nodes, tokens, heads, links, where,
                out is not rope_out)


def _heads_dim(x, linked):
    """The dim of ``x`` that holds heads: one cos/sin do not run along, preferably the one
    adjacent to head_dim in memory (q, k are views of a projection ``[..., heads * head_dim]``,
    transposed or not)."""
    free = [d for d in range(x.dim() - 1) if d not in linked]
    if not free:
        raise NoMatch(f"cos/sin vary along every leading dim of the normed {list(x.shape)}, "
                      "heads too: not one rotation per token")
    return next((d for d in free if _same(x.stride(d), x.shape[-1])), free[-1])


def _check_cos_sin(rope, links):
    sources = []
    for what, columns in (("cos", rope.cos), ("sin", rope.sin)):
        source = columns[0][0]
        sources.append(source)
        if any(s is not source for s, _ in columns):
            raise NoMatch(f"the {what} columns come from several tensors")
        if progression([c for _, c in columns]) is None:
            raise NoMatch(f"the {what} columns of {source.name} are not evenly spaced")
        unlinked = [d for d, s in enumerate(meta_shape(source)[:-1])
                    if not _is_one(s) and d not in links[source]]
        if unlinked:
            raise NoMatch(f"dims {unlinked} of {what} ({source.name}) match no token dim")
    cos, sin = sources
    cos_dtype, sin_dtype = (meta_val(n).dtype.to_real() for n in (cos, sin))
    if cos_dtype not in _CACHE_DTYPES or cos_dtype != sin_dtype:
        raise NoMatch(f"cos/sin dtypes {cos_dtype}, {sin_dtype} unsupported (cuqk takes one of "
                      f"{', '.join(ACTIVATION_DTYPES)} for both)")
    if cos is not sin and (links[cos] != links[sin]
                           or meta_shape(cos)[:-1] != meta_shape(sin)[:-1]):
        raise NoMatch(f"cos ({cos.name}) and sin ({sin.name}) are laid out differently")


def progression(columns):
    """``(start, step)`` if ``columns`` are evenly spaced and increasing, else None."""
    step = columns[1] - columns[0] if len(columns) > 1 else 1
    if step < 1 or any(c != columns[0] + i * step for i, c in enumerate(columns)):
        return None
    return columns[0], step


def _region(trace, rope_out, norm, out):
    """The nodes the trace evaluated up to ``rope_out``, and the norm's; each must feed only the
    others (or be ``out``, the node the fused op replaces)."""
    region, todo = {rope_out}, [rope_out]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg in trace.values and arg not in region:
                region.add(arg)
                todo.append(arg)
    region.update(norm.nodes)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    for node in sorted(region, key=order.__getitem__):
        outside = [u for u in node.users if u not in region]
        if node is not out and outside:
            user = outside[0]
            why = ("a graph output (saved for backward, or returned)" if user.op == "output"
                   else f"{user.name} ({user.target})")
            raise NoMatch(f"{node.name} inside the pattern is also used by {why}")
    return tuple(sorted(region, key=order.__getitem__))


