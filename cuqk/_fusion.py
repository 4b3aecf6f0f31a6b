"""Inductor pass: per-head RMSNorm followed by RoPE becomes ``torch.ops.cuqk.qk_norm_rope``.

Turned on by ``cuqk.torch.enable_fusion()``, which installs :class:`FusionPass` as
``torch._inductor.config.post_grad_custom_pre_pass``. That hook sees the graph after
decomposition and functionalization (plain ATen: every spelling of the norm and of RoPE arrives
as the same few ops), before Inductor's own pattern passes rewrite those ops; it is a plain
config entry that torch 2.11 and 2.13 both read, and the pass's ``uuid`` keeps Inductor's graph
cache usable.

How a site is found (``cuqk._fusion_match``):

1. Norm: each ``rsqrt(mean(x * x, last dim, keepdim) + eps)`` times ``x`` (float32 casts
   allowed), or ``aten._fused_rms_norm`` (``F.rms_norm`` where the device has a fused kernel),
   then optionally times ``w`` (norm="rms") or ``1 + w`` (norm="gemma"), giving ``y``.
2. RoPE: the ops after ``y`` are evaluated symbolically along head_dim. Each element of each
   value is a sum of terms ``±y[i] * side``, where ``side`` is one column of a tensor that is not
   computed from ``y`` (cos or sin). Views, permutes, slices, split, cat, neg, add, sub and
   multiplies by such tensors are followed; the first value whose elements are
   ``y[a]*c - y[b]*s`` and ``y[b]*c + y[a]*s`` over pairs ``(i, i + r/2)`` (NeoX) or
   ``(2i, 2i + 1)`` (GPT-J), and ``y[i]`` past ``r``, is the RoPE output. So the spelling
   (rotate_half, chunk, strided slices, stack) does not matter, only the arithmetic. A complex
   product ``view_as_complex(y) * (c + i s)`` is followed as the GPT-J pairs it is.
2b. RoPE first (Llama 4): a norm with no RoPE after it is checked the other way round: the
   near ancestors of its input with the same last dim are evaluated forward, farthest first;
   one whose evaluation reaches the norm input as its RoPE is the fused call's input, with
   ``rope_first=True``, and the norm output is what the call replaces.
3. Layout: the dims cos/sin run along are tokens; of the others, the one next to head_dim in
   memory is heads (so q normalised as ``[B, S, H, D]`` or as ``[B, H, S, D]`` both work).
4. cos/sin: a gather ``cache[positions]`` whose halves are exactly the c and s columns is passed
   as ``(positions, cache)``; any other cos/sin tensors (transformers' per-token ``[B, S, r]``)
   are sliced into a per-token ``[tokens, r]`` cache passed with ``positions=None``.
   transformers repeats each frequency in both elements of a pair; the pass reads the first copy
   and says so in the report.
5. Sites with the same tokens, head_dim, RoPE, cos/sin and eps are paired (q with k) into one
   call; nothing is fused that the pass cannot pair, and nothing is skipped without a reason in
   :func:`report`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from . import _fusion_match
from . import torch as _ops  # noqa: F401  (registers torch.ops.cuqk)
from ._fusion_match import (
    CAST,
    GATHERS,
    NoMatch,
    find_rope_first_site,
    find_site,
    is_call,
    match_norm,
    meta_shape,
    meta_val,
    origin,
    progression,
)

aten = torch.ops.aten


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class FusedSite:
    """One ``torch.ops.cuqk.qk_norm_rope`` call that replaced a q and a k norm + RoPE."""

    graph: str
    q: str
    k: str
    tokens: tuple  # sizes as strings (symbolic under dynamic shapes)
    num_q_heads: int | str
    num_kv_heads: int | str
    head_dim: int
    rotary_dim: int
    is_neox: bool
    norm: str
    eps: float
    cos_sin: str
    rope_first: bool = False

    def __str__(self):
        style = "NeoX" if self.is_neox else "GPT-J"
        order = "RoPE then norm" if self.rope_first else "norm then RoPE"
        return (f"[{self.graph}] {self.q} + {self.k}: tokens {list(self.tokens)}, "
                f"{self.num_q_heads}/{self.num_kv_heads} heads x {self.head_dim}, {order}, "
                f"{style} rotary {self.rotary_dim}, norm={self.norm} eps={self.eps:g}, "
                f"{self.cos_sin}")


@dataclass(frozen=True)
class Rejected:
    """A norm followed by something RoPE-like that the pass left as it was, and why."""

    graph: str
    where: str
    reason: str

    def __str__(self):
        return f"[{self.graph}] {self.where}: {self.reason}"


@dataclass(frozen=True)
class FusionReport:
    """What the pass did since fusion was enabled.

    ``fused``: each site replaced; ``rejected``: each candidate left, with the reason;
    ``ignored``: names of RMSNorms with nothing RoPE-like after them (layer norms feeding a
    projection); ``cached_graphs``: graphs Inductor loaded from its caches instead of compiling,
    which were fused (or not) when first compiled and are not listed here.
    """

    fused: tuple
    rejected: tuple
    ignored: tuple
    cached_graphs: int

    def __str__(self):
        lines = [f"cuqk fusion: {len(self.fused)} fused, {len(self.rejected)} rejected, "
                 f"{len(self.ignored)} norms without RoPE ignored"]
        lines += [f"  fused    {site}" for site in self.fused]
        lines += [f"  rejected {site}" for site in self.rejected]
        if self.cached_graphs:
            lines.append(f"  {self.cached_graphs} graph(s) loaded from Inductor's caches, not "
                         "re-examined (torch._inductor.config.fx_graph_cache = False and "
                         "torch._functorch.config.enable_autograd_cache = False list them too)")
        return "\n".join(lines)


_fused: list = []
_rejected: list = []
_ignored: list = []
_cache_hits_at_enable = [(0, 0)]


def _cache_hits():
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"]


def report() -> FusionReport:
    """A snapshot of what the pass did since :func:`enable`."""
    # A graph from AOTAutograd's cache may count as a hit of Inductor's cache too.
    cached = max(now - then for now, then in zip(_cache_hits(), _cache_hits_at_enable[0]))
    return FusionReport(tuple(_fused), tuple(_rejected), tuple(_ignored), cached)


# ----------------------------------------------------------------------------- the hook


class FusionPass(torch._inductor.custom_graph_pass.CustomGraphPass):
    """The post-grad pass; runs ``previous`` (the pass or list of passes the user had
    installed) first."""

    def __init__(self, previous=None):
        self.previous = previous

    def _previous(self):
        if self.previous is None:
            return ()
        return tuple(self.previous) if isinstance(self.previous, (list, tuple)) else \
            (self.previous,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for earlier in self._previous():
            earlier(graph)
        fuse(graph)

    def uuid(self):
        # Inductor keys its graph cache on this: the pass's source, and the previous passes'
        # (None, which turns the cache off, if one of them cannot say).
        ours = torch._inductor.custom_graph_pass.get_hash_for_files(
            (__file__, _fusion_match.__file__))
        theirs = tuple(getattr(p, "uuid", lambda: None)() for p in self._previous())
        return None if None in theirs else (ours, *theirs)


def enable() -> None:
    """Install the pass (keeping a pass the user installed, run first) and clear the report."""
    from torch._inductor import config

    current = config.post_grad_custom_pre_pass
    if not isinstance(current, FusionPass):
        config.post_grad_custom_pre_pass = FusionPass(current)
    for entries in (_fused, _rejected, _ignored):
        entries.clear()
    _cache_hits_at_enable[0] = _cache_hits()


def disable() -> None:
    """Put back what :func:`enable` replaced."""
    from torch._inductor import config

    current = config.post_grad_custom_pre_pass
    if isinstance(current, FusionPass):
        config.post_grad_custom_pre_pass = current.previous


# ----------------------------------------------------------------------------- the pass


def _graph_name():
    compile_id = torch._guards.CompileContext.current_compile_id()
    return "?" if compile_id is None else str(compile_id)


def fuse(graph: torch.fx.Graph) -> int:
    """Replace every norm + RoPE pair in ``graph``; record each decision; return the count."""
    name = _graph_name()
    sites = []
    for node in list(graph.nodes):
        if not is_call(node, {aten.rsqrt.default, aten._fused_rms_norm.default}):
            continue
        where = origin(node)
        try:
            norm = match_norm(node)
            site = None if norm is None else (find_site(norm, where)
                                              or find_rope_first_site(norm, where))
        except NoMatch as exc:
            _rejected.append(Rejected(name, where, str(exc)))
            continue
        if site is not None:
            sites.append(site)
        elif norm is not None:
            _ignored.append(where)
    pairs = _pair(sites, name)
    for q, k in pairs:
        _fused.append(_describe(name, q, k, _emit(graph, q, k)))
    if pairs:
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)
        graph.lint()
    return len(pairs)


def _pair(sites, name):
    order = {n: i for i, n in enumerate(sites[0].out.graph.nodes)} if sites else {}
    free = sorted(sites, key=lambda s: order[s.out])
    pairs = []
    while free:
        first = free.pop(0)
        partner = next((s for s in free if s.key() == first.key()
                        and not _depends(s.norm.x, first.out, order)
                        and not _depends(first.norm.x, s.out, order)), None)
        if partner is None:
            _rejected.append(Rejected(name, first.where, (
                "no second norm + RoPE with the same tokens, head_dim, RoPE, cos/sin, eps and "
                "dtypes to pair with (cuqk fuses q and k in one call)")))
            continue
        free.remove(partner)
        pairs.append(_q_first(first, partner))
    return pairs


def _q_first(a, b):
    """``(q, k)``: q is the one with more heads (grouped-query attention), else ``a``."""
    heads_a, heads_b = meta_shape(a.norm.x)[a.heads], meta_shape(b.norm.x)[b.heads]
    if isinstance(heads_a, int) and isinstance(heads_b, int) and heads_b > heads_a:
        return b, a
    return a, b


def _depends(node, on, order):
    """Whether ``node`` is computed from ``on``."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is on:
            return True
        for arg in n.all_input_nodes:
            if arg not in seen and order.get(arg, -1) >= order[on]:
                seen.add(arg)
                todo.append(arg)
    return False


class _Emitter:
    """Adds call_function nodes, with their fake values for Inductor, before ``anchor``."""

    def __init__(self, graph, anchor, example):
        self.graph, self.anchor = graph, anchor
        self.fake_mode = torch._guards.detect_fake_mode([meta_val(example)])

    def __call__(self, target, *args):
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        values = torch.fx.node.map_arg(args, meta_val)
        with self.fake_mode:
            node.meta["val"] = target(*values)
        return node


def _emit(graph, q, k):
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [q.norm.x, k.norm.x, q.norm.weight, k.norm.weight, q.rope.cos[0][0],
              q.rope.sin[0][0]]
    if is_call(q.rope.cos[0][0], GATHERS):
        inputs += q.rope.cos[0][0].all_input_nodes
    latest = max((n for n in inputs if n is not None), key=order.__getitem__)
    call = _Emitter(graph, latest.next, q.norm.x)
    positions, cache, cos_sin = _cos_sin_cache(call, q)
    fused = call(torch.ops.cuqk.qk_norm_rope.default, _heads_last(call, q), _heads_last(call, k),
                 positions, q.norm.weight, k.norm.weight, cache, q.norm.eps, q.rope.is_neox,
                 q.rope.rotary_dim, q.norm.kind, q.rope_first)
    for index, site in enumerate((q, k)):
        site.out.replace_all_uses_with(_relayout(call, call(operator.getitem, fused, index),
                                                 site))
    dead = sorted({n for site in (q, k) for n in site.region + site.side_nodes},
                  key=order.__getitem__, reverse=True)
    for node in dead:
        if not node.users:
            graph.erase_node(node)
    return cos_sin


def _heads_last(call, site):
    """The norm input as cuqk takes it, ``[*tokens, heads, head_dim]`` (a view)."""
    order = [*site.tokens, site.heads]
    if order == sorted(order):
        return site.norm.x
    return call(aten.permute.default, site.norm.x, [*order, len(order)])


def _cos_sin_cache(call, site):
    """``(positions, cache, description)`` for the cuqk call: the gathered cache itself, or
    per-token rows."""
    rope = site.rope
    half = rope.rotary_dim // 2
    source = rope.cos[0][0]
    tokens = len(site.tokens)
    links = site.links[source]
    if (rope.sin[0][0] is source and is_call(source, GATHERS)
            and [c for _, c in rope.cos] == list(range(half))
            and [c for _, c in rope.sin] == list(range(half, 2 * half))):
        table, index = _gather_args(source)
        if (index is not None and len(meta_shape(table)) == 2
                and meta_shape(table)[1] == rope.rotary_dim
                and meta_val(index).dtype in (torch.int32, torch.int64)
                and len(meta_shape(index)) == tokens and links == {d: d for d in range(tokens)}):
            return index, table, f"cos_sin_cache {table.name} gathered by {index.name}"
    halves = []
    for columns in (rope.cos, rope.sin):
        start, step = progression([c for _, c in columns])
        halves.append(call(aten.slice.Tensor, _real_columns(call, columns[0][0]), -1, start,
                           start + step * (half - 1) + 1, step))
    cache = call(aten.cat.default, halves, -1)
    # Keep the source dims that meet the tokens (the others are unit), in token order.
    linked = sorted(links, key=links.__getitem__)
    for d in reversed(range(len(meta_shape(source)) - 1)):
        if d not in links:
            cache = call(aten.select.int, cache, d, 0)
            linked = [s - (s > d) for s in linked]
    if linked != sorted(linked):
        cache = call(aten.permute.default, cache, [*linked, len(linked)])
    present = set(links.values())
    for t in range(tokens):
        if t not in present:
            cache = call(aten.unsqueeze.default, cache, t)
    sizes = [-1 if t in present else _size(call, site.norm.x, site.tokens[t])
             for t in range(tokens)]
    if any(not (isinstance(s, int) and s in (-1, 1)) for s in sizes):
        cache = call(aten.expand.default, cache, [*sizes, -1])
    cos_sin = f"per-token cos/sin ({source.name}, {rope.sin[0][0].name}"
    if rope.copies:
        cos_sin += "; first copy of each frequency, as transformers lays them out"
    return None, call(aten.reshape.default, cache, [-1, rope.rotary_dim]), cos_sin + ")"


def _real_columns(call, source):
    """``source``, or for a complex ``cos + i sin`` (Llama 4's freqs_cis) ``[real | imag]``,
    whose columns the matcher numbered."""
    if not meta_val(source).is_complex():
        return source
    return call(torch.ops.cuqk.cos_sin_of_complex.default, source)


def _gather_args(node):
    """``(table, index)`` of a row gather; index None when it gathers along another dim."""
    if node.target is aten.index.Tensor:
        indices = node.args[1]
        return node.args[0], (indices[0] if len(indices) == 1 else None)
    if node.target is aten.index_select.default:
        return node.args[0], (node.args[2] if node.args[1] == 0 else None)
    return node.args[0], node.args[1]  # embedding(weight, indices)


def _size(call, node, dim):
    size = meta_shape(node)[dim]
    return size if isinstance(size, int) else call(aten.sym_size.int, node, dim)


def _relayout(call, result, site):
    """The op's ``[*tokens, heads, head_dim]`` result in the layout and dtype of the RoPE
    output it replaces."""
    dims = [*site.tokens, site.heads]  # the dim of x each dim of the result is
    present = [ids[0] for ids in site.out_lead if ids]
    for d in reversed(range(len(dims))):
        if dims[d] not in present:  # a unit dim of x
            result = call(aten.select.int, result, d, 0)
            del dims[d]
    permutation = [dims.index(i) for i in present]
    if permutation != sorted(permutation):
        result = call(aten.permute.default, result, [*permutation, len(permutation)])
    for position, ids in enumerate(site.out_lead):
        if not ids:
            result = call(aten.unsqueeze.default, result, position)
    dtype = meta_val(site.out).dtype
    return result if meta_val(result).dtype == dtype else call(CAST, result, dtype)


def _describe(name, q, k, cos_sin):
    def static(size):
        return size if isinstance(size, int) else str(size)

    x = meta_shape(q.norm.x)
    return FusedSite(name, q.where, k.where, tuple(str(x[d]) for d in q.tokens),
                     static(x[q.heads]), static(meta_shape(k.norm.x)[k.heads]), x[-1],
                     q.rope.rotary_dim, q.rope.is_neox, q.norm.kind, q.norm.eps, cos_sin,
                     q.rope_first)
