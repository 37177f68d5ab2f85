"""Passes for the attention block: `rope_kvcache` and `attention`.

Both work on a static KV cache: a 4-D tensor [Bmax, Hkv, S, D] that is a placeholder of
the captured graph - a buffer of the model (gpt-fast, the built-in models) or a tensor
the caller passes (Hugging Face's `StaticCache`) - possibly sliced to the batch
(`cache[:B]`). Neither pass looks at class or attribute names.

`rope_kvcache` site, in one module (the innermost one holding the key rotation and the
cache writes, e.g. `layers.0.attn`):
- two cache writes `cache.index_copy_(2, pos, x)` with one position tensor `pos`: the
  key write, whose value is a rotation `k * cos + rotate_half(k) * sin`, and the value
  write; `rotate_half(x) = cat(-x2, x1)` with x1, x2 the halves of x (`chunk` or slices);
- cos and sin are rows of [max_seq, D] tables read at `pos` itself (`table[pos]`, through
  casts and broadcasting), so one position tensor drives both the rotation and the
  writes, as the fused kernel requires;
- the query is rotated with the same cos and sin, and q, k, v are projections viewed
  [B, T, H, D] and transposed to [B, H, T, D];
- an FP8 cache (float8 placeholder) is written through a byte view
  (`cache.view(uint8).index_copy_(2, pos, codes.view(uint8))`) with the codes
  `fp8(clamp(x.float() / s.view(1, -1, 1, 1), -fmax, fmax))`, s a [Hkv] scale per KV head
  (also a placeholder) and fmax the format's largest value; a cache of a wider dtype
  written with those codes times s is an emulated FP8 cache. The kernel gets the scales.

`attention` site: `scaled_dot_product_attention(q, k, v, attn_mask=M)` or the written-out
`softmax([sink,] mask(softcap(scale * q k^T))) @ v` (scale, then soft-cap, then mask:
the kernel's order), where
- k and v are cache tensors, read directly (SDPA's `enable_gqa`), through
  `repeat_interleave(rep, dim=1)`, or through Hugging Face's `repeat_kv`
  (`c[:, :, None].expand(...).reshape(...)`): query head h reads KV head h // rep;
- the mask M is a position mask: `arange(S)[key] <= P[query]`, optionally
  `& arange(S)[key] > P[query] - W` (a sliding window of W), with P a 1-D tensor of the
  T query positions; boolean (SDPA, `masked_fill(~M, -inf)`, `where(M, s, -inf)`) or
  additive (`s + where(M, 0, min)`). P becomes the kernel's `input_pos`, so the kernel
  sees exactly the keys the mask lets through, whatever wrote the cache.
- a sink is a per-head parameter concatenated as one extra softmax column and dropped
  after (gpt-oss);
- an FP8 cache is read dequantized, `cache.float() * s.view(1, -1, 1, 1)` with s a [Hkv]
  scale placeholder (then cast): the kernel reads the codes and gets the scales.

Near misses: each pass's `explain(view)` maps the module of a computation that looks
like a site but is not one to the reason, so a report can say why a rule lost a place.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterator, Optional, Union

import torch
import torch.fx as fx

from .fusions import FusedWeights, FusionPass, Site, _const, erase_unused
from .graph import (MUL_METHODS, MUL_TARGETS, GraphView, adopt, example, hint, is_add, is_call, node_arg, node_module,
                    same_dims, shape_dtype)

_CASTS = {"to", "float", "type_as", "contiguous", "bfloat16", "half", "type"}


def _strip(n: Any, methods=_CASTS) -> Any:
    """Walk back through dtype casts and contiguous copies."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in methods:
        n = n.args[0]
    return n


def _last_dim(n: fx.Node, dim: Any) -> bool:
    """Whether `dim` names n's last dimension."""
    sd = shape_dtype(n)
    return dim == -1 or (sd is not None and dim == len(sd[0]) - 1)


# ----------------------------------------------------------------------------- caches

def _batch_slice_base(n: Any) -> Any:
    """x when n is x[:B] (a prefix slice of dim 0 only), else n."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem:
        idx = n.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        first, rest = idx[0], idx[1:]
        if (isinstance(first, slice) and first.start in (None, 0) and first.step in (None, 1)
                and all(r == slice(None) or r is Ellipsis for r in rest)):
            return n.args[0]
    return n


def _bytes_of(n: Any) -> Any:
    """x when n is x.view(dtype) (the same bytes read as another dtype), else n."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target == "view" and len(n.args) == 2 \
            and isinstance(n.args[1], torch.dtype):
        n = n.args[0]
    return n


def _cache(view: GraphView, n: Any) -> Optional[fx.Node]:
    """The 4-D cache placeholder behind n = cache or cache[:B] (or a byte view of either)."""
    base = _bytes_of(_batch_slice_base(_bytes_of(n)))
    t = view.input_tensor(base)
    return base if t is not None and t.dim() == 4 else None


_FP8_FORMATS = {torch.float8_e4m3fn: ("fp8_e4m3", 448.0), torch.float8_e5m2: ("fp8_e5m2", 57344.0)}
_SHAPE_OPS = {"view", "reshape", "unsqueeze"}


def _head_scale(view: GraphView, n: Any) -> Optional[fx.Node]:
    """The placeholder s [H] when n is s broadcast as [1, H, 1, 1] (view, reshape,
    unsqueeze or `s[None, :, None, None]`, through casts): a scale per KV head."""
    sd = shape_dtype(n)
    if sd is None or len(sd[0]) != 4 or not isinstance(sd[0][1], int) or \
            any(not (isinstance(d, int) and d == 1) for i, d in enumerate(sd[0]) if i != 1):
        return None
    base = n
    while isinstance(base, fx.Node) and base.op != "placeholder":
        if base.op == "call_method" and (base.target in _SHAPE_OPS or base.target in _CASTS):
            base = base.args[0]
        elif is_call(base, {torch.unsqueeze, torch.reshape}):
            base = base.args[0]
        elif base.op == "call_function" and base.target is operator.getitem and isinstance(base.args[1], tuple):
            base = base.args[0]
        else:
            return None
    t = view.input_tensor(base)
    return base if t is not None and t.dim() == 1 and t.numel() == sd[0][1] else None


def _walk_casts(n: Any, seen: list) -> Any:
    """_strip that also records the nodes it walks through (and byte views)."""
    while isinstance(n, fx.Node) and ((n.op == "call_method" and n.target in _CASTS) or _bytes_of(n) is not n):
        seen.append(n)
        n = _bytes_of(n) if _bytes_of(n) is not n else n.args[0]
    return n


def _quantized(view: GraphView, value: Any) -> Optional[dict]:
    """What a cache write stores, when it is FP8-quantized with a scale per KV head:
    `fp8(clamp(x / s[h], -fmax, fmax))` (through casts and byte views), or, emulated, that
    times s[h]. Returns {x, scale, format, emulated, nodes (the quantize chain)}."""
    nodes: list = []
    n = _walk_casts(value, nodes)
    emulated = None
    if is_call(n, MUL_TARGETS, MUL_METHODS) and len(n.args) == 2:
        for a, b in (n.args, tuple(reversed(n.args))):
            s = _head_scale(view, b)
            if s is not None and isinstance(a, fx.Node):
                nodes += [n, b]
                emulated, n = s, _walk_casts(a, nodes)
                break
        else:
            return None
    if not is_call(n, {torch.clamp, torch.clip}, ("clamp", "clip")):
        return None
    lo, hi = _const(node_arg(n, 1, "min")), _const(node_arg(n, 2, "max"))
    if lo is None or hi is None or lo != -hi or hi <= 0:
        return None
    nodes.append(n)
    n = _walk_casts(n.args[0], nodes)
    if not (is_call(n, {operator.truediv, torch.div}, ("div", "__truediv__")) and len(n.args) == 2
            and n.kwargs.get("rounding_mode") is None):
        return None
    scale = _head_scale(view, n.args[1])
    if scale is None or (emulated is not None and emulated is not scale):
        return None
    nodes += [n, n.args[1]]
    fp8 = [shape_dtype(m)[1] for m in nodes if shape_dtype(m) is not None and shape_dtype(m)[1] in _FP8_FORMATS]
    if not fp8 or _FP8_FORMATS[fp8[0]][1] != hi:
        return None  # no FP8 cast, or a clamp at another bound than the format's largest value
    return {"x": _strip(n.args[0]), "scale": scale, "format": _FP8_FORMATS[fp8[0]][0],
            "emulated": emulated is not None, "nodes": nodes}


def _is_index_copy(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "index_copy_") or (
        n.op == "call_function" and getattr(n.target, "__name__", "") == "index_copy_")


def _cache_writes(view: GraphView) -> list[dict]:
    """Every `cache.index_copy_(2, pos, value)` on a cache placeholder."""
    out = []
    for n in view.graph.nodes:
        if not _is_index_copy(n) or len(n.args) < 4:
            continue
        target, dim, pos, value = n.args[:4]
        cache = _cache(view, target)
        if cache is not None and dim in (2, -2):
            out.append({"node": n, "cache": cache, "pos": _strip(pos), "value": value})
    return out


# ----------------------------------------------------------------------------- rotary embedding

def _half_of(n: Any) -> Optional[tuple[fx.Node, int]]:
    """(x, 0 or 1) when n is the first or second half of x's last dimension:
    `x.chunk(2, -1)[i]` or `x[..., :D/2]` / `x[..., D/2:]`."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem):
        return None
    src, idx = n.args
    if is_call(src, {torch.chunk}, ("chunk",)) and idx in (0, 1):
        x = src.args[0]
        if node_arg(src, 1, "chunks") == 2 and _last_dim(x, node_arg(src, 2, "dim", 0)):
            return x, idx
        return None
    sd = shape_dtype(src)
    if sd is None or not isinstance(idx, tuple) or not idx or not isinstance(idx[-1], slice):
        return None
    lead = idx[:-1]
    if not (lead == (Ellipsis,) or (len(lead) == len(sd[0]) - 1 and all(i == slice(None) for i in lead))):
        return None
    half, sl = sd[0][-1] // 2, idx[-1]
    if sd[0][-1] % 2 or sl.step not in (None, 1):
        return None
    if sl.start in (None, 0) and sl.stop == half:
        return src, 0
    if sl.start == half and sl.stop in (None, sd[0][-1]):
        return src, 1
    return None


def _rotate_half_input(n: Any) -> Optional[fx.Node]:
    """x when n is rotate_half(x) = cat([-x2, x1], -1) with x1, x2 the halves of x."""
    if not is_call(n, {torch.cat}) or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
        return None
    if not _last_dim(n, node_arg(n, 1, "dim", 0)):
        return None
    neg, first = n.args[0]
    if not is_call(neg, {operator.neg, torch.neg}, ("neg", "__neg__")):
        return None
    h1, h2 = _half_of(first), _half_of(neg.args[0])
    if h1 is None or h2 is None or h1[0] is not h2[0] or (h1[1], h2[1]) != (0, 1):
        return None
    return h1[0]


def _rope(n: Any) -> Optional[dict]:
    """{x, cos, sin} when n is x * cos + rotate_half(x) * sin (any operand order)."""
    if not is_add(n) or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    a, b = n.args
    for m1, m2 in ((a, b), (b, a)):
        if not (is_call(m1, MUL_TARGETS, MUL_METHODS) and is_call(m2, MUL_TARGETS, MUL_METHODS)):
            continue
        for x, cos in (m1.args, tuple(reversed(m1.args))):
            for rh, sin in (m2.args, tuple(reversed(m2.args))):
                if isinstance(x, fx.Node) and _rotate_half_input(rh) is x:
                    return {"x": x, "cos": cos, "sin": sin}
    return None


_BROADCASTS = {"unsqueeze", "expand", "expand_as"}


def _unbroadcast(n: Any) -> Any:
    """Walk back through ops that only add or broadcast unit dimensions, or cast without
    changing the meaning: unsqueeze, expand, `x[None, :]`-style indexing, `.to`."""
    while isinstance(n, fx.Node):
        if n.op == "call_method" and (n.target in _BROADCASTS or n.target in _CASTS):
            n = n.args[0]
        elif is_call(n, {torch.unsqueeze}):
            n = n.args[0]
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], tuple) \
                and all(i is None or i is Ellipsis or i == slice(None) for i in n.args[1]) \
                and any(i is None for i in n.args[1]):
            n = n.args[0]
        else:
            break
    return n


def _unit_except(n: Any, trailing: tuple) -> bool:
    """Whether n's shape ends with `trailing` and is 1 in every other dimension (so n is
    a tensor of that trailing shape, only broadcast)."""
    sd = shape_dtype(n)
    if sd is None or len(sd[0]) < len(trailing):
        return False
    shape, k = tuple(sd[0]), len(trailing)
    return same_dims(shape[len(shape) - k:], tuple(trailing)) and \
        all(isinstance(d, int) and d == 1 for d in shape[:len(shape) - k])


def _table(view: GraphView, n: Any, x: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(table placeholder [L, D], position node) when n is `table[pos]` (through casts and
    unit dimensions) and broadcasts against x [B, H, T, D] as [T, D]."""
    sd = shape_dtype(x)
    if sd is None or len(sd[0]) != 4 or not isinstance(n, fx.Node):
        return None
    if not _unit_except(n, tuple(sd[0][2:])):  # [T, D], broadcast over batch and heads
        return None
    base = _unbroadcast(n)
    if not (base.op == "call_function" and base.target is operator.getitem and isinstance(base.args[1], fx.Node)):
        return None
    table, pos = base.args
    t = view.input_tensor(table)
    psd = shape_dtype(pos)
    if t is None or t.dim() != 2 or psd is None or len(psd[0]) != 1 or psd[1].is_floating_point:
        return None
    return table, _strip(pos)


def _bthd(x: Any) -> Optional[fx.Node]:
    """The [B, T, H, D] tensor that x = y.transpose(1, 2) came from."""
    if isinstance(x, fx.Node) and x.op == "call_method" and x.target == "transpose" \
            and tuple(x.args[1:]) in ((1, 2), (2, 1)):
        return x.args[0]
    return None


def _common_module(a: Optional[str], b: Optional[str]) -> str:
    pa, pb = (a or "").split("."), (b or "").split(".")
    out = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


Found = Union[Site, str]


class RopeKVCachePass(FusionPass):
    """q, k rotation + the cache write of k and v -> planlang::rope_kvcache (see the
    module docstring for how a site is recognised)."""

    kind = "rope_kvcache"

    def find(self, view: GraphView) -> list[Site]:
        return [s for _, s in self._candidates(view) if isinstance(s, Site)]

    def explain(self, view: GraphView) -> dict[str, str]:
        """Module path -> why the rotation / cache write there is no site."""
        return {p: s for p, s in self._candidates(view) if isinstance(s, str)}

    def _candidates(self, view: GraphView) -> Iterator[tuple[str, Found]]:
        by_module: dict[str, list[dict]] = {}
        for w in _cache_writes(view):
            by_module.setdefault(node_module(w["node"]) or "", []).append(w)
        ropes = [(n, r) for n in view.graph.nodes if (r := _rope(n)) is not None]
        for path, ws in by_module.items():
            yield self._site(view, path, ws, ropes)
        # Rotations with no static-cache write near them (e.g. a dynamic cache that concatenates).
        written = set(by_module)
        for n, _ in ropes:
            path = node_module(n) or ""
            if not any(w == path or w.startswith(path + ".") or path.startswith(w + ".") for w in written):
                yield path, ("rotary embedding but no static KV-cache write `cache.index_copy_(2, pos, k)` "
                             "in this module: the cache is dynamic (concatenated), rolling (a full "
                             "sliding-window cache) or absent")
                written.add(path)

    def _site(self, view: GraphView, path: str, ws: list[dict], ropes) -> tuple[str, Found]:
        if len(ws) != 2:
            return path, f"expected one key and one value cache write, found {len(ws)}"
        for w in ws:
            w["quant"] = _quantized(view, w["value"])
            w["stored"] = w["quant"]["x"] if w["quant"] else w["value"]
            if w["quant"] is None and view.input_tensor(w["cache"]).dtype in _FP8_FORMATS:
                return path, ("an FP8 cache written without the per-KV-head quantize "
                              "fp8(clamp(x / scale[h], -fmax, fmax)) planlang::rope_kvcache computes")
        quants = [w["quant"] for w in ws]
        if any(quants) and (not all(quants) or len({(q["format"], q["emulated"]) for q in quants}) != 1):
            return path, "the key and value cache writes are quantized differently"
        roped = [(_rope(_strip(w["stored"])), w) for w in ws]
        krope = [(r, w) for r, w in roped if r is not None]
        if len(krope) != 1:
            return path, "the key written to the cache is not rotated as x*cos + rotate_half(x)*sin"
        (rk, kw), = krope
        vw = next(w for w in ws if w is not kw)
        place = _common_module(path, node_module(_strip(kw["stored"])))
        pos = kw["pos"]
        if vw["pos"] is not pos or kw["cache"] is vw["cache"]:
            return place, "the key and value writes use different positions or one cache"
        k_rot = _strip(kw["stored"])
        tc, ts = _table(view, rk["cos"], rk["x"]), _table(view, rk["sin"], rk["x"])
        if tc is None or ts is None:
            return place, ("cos/sin are computed each call, not rows of a [max_seq, D] table read at "
                           "the positions; planlang::rope_kvcache reads a table at the cache write positions")
        if tc[1] is not pos or ts[1] is not pos:
            return place, ("the rotary positions and the cache write positions are different tensors "
                           "(e.g. position ids vs the cache's own counter); the fused kernel uses one for both")
        k_in, v_in = _bthd(rk["x"]), _bthd(_strip(vw["stored"]))
        if k_in is None or v_in is None:
            return place, "k and v are not [B, T, H, D] projections transposed to [B, H, T, D]"
        qropes = [n for n, r in ropes if n is not k_rot and _common_module(node_module(n), place) == place
                  and _table(view, r["cos"], r["x"]) == tc and _table(view, r["sin"], r["x"]) == ts]
        if len(qropes) != 1:
            return place, f"expected one query rotation with the key's cos/sin, found {len(qropes)}"
        q_in = _bthd(_rope(qropes[0])["x"])
        if q_in is None:
            return place, "q is not a [B, T, H, D] projection transposed to [B, H, T, D]"
        kq, vq = kw["quant"], vw["quant"]
        return place, Site(self.kind, place, (place,),
                           {"q": q_in, "k": k_in, "v": v_in, "cos": tc[0], "sin": ts[0], "pos": pos,
                            "k_cache": kw["cache"], "v_cache": vw["cache"], "q_rope": qropes[0],
                            "k_rope": k_rot, "k_write": kw["node"], "v_write": vw["node"],
                            "k_scale": kq["scale"] if kq else None, "v_scale": vq["scale"] if vq else None,
                            "quant_nodes": (kq["nodes"] + vq["nodes"]) if kq else []},
                           {"kv_format": kq["format"] if kq else ""})

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        n = site.nodes
        order = {node: i for i, node in enumerate(g.nodes)}
        inputs = [n[k] for k in ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "pos")]
        scales = [n["k_scale"], n["v_scale"]] if n["k_scale"] is not None else []
        last = max(inputs + scales, key=order.__getitem__)
        first_user = min((u for u in n["q_rope"].users), key=order.__getitem__, default=None)
        if first_user is not None and order[first_user] <= order[last]:
            return "skipped: the query rotation is used before the cache inputs exist"
        with g.inserting_before(last.next):  # (inserting_after would reverse the three nodes)
            args = tuple(inputs) + ((*scales, site.info["kv_format"]) if scales else ())
            fused = g.call_function(torch.ops.planlang.rope_kvcache.default, args)
            q_rot = g.call_function(operator.getitem, (fused, 0))
            q_new = g.call_method("transpose", (q_rot, 1, 2))
        for x in (fused, q_rot):
            adopt(x, n["k_write"], value=False)
        adopt(q_new, n["q_rope"])
        n["q_rope"].replace_all_uses_with(q_new)
        # The writes are now done by the fused op; their results (the cache views) stay.
        targets = [n["k_write"].args[0], n["v_write"].args[0]]
        for w in (n["k_write"], n["v_write"]):
            w.replace_all_uses_with(w.args[0])
        erase_unused(g, [n["k_write"], n["v_write"]])
        # An FP8 cache's quantize chain and byte views of the cache are the kernel's now.
        erase_unused(g, list(dict.fromkeys(n["quant_nodes"] + [t for t in targets if _bytes_of(t) is not t])))
        for w in (n["k_rope"], n["q_rope"]):
            erase_unused(g, _ancestors_until(w, set(inputs)))
        return "rope_kvcache"


def _ancestors_until(node: fx.Node, stop: set) -> list[fx.Node]:
    """node and the nodes only it needs, stopping at `stop` (for erase_unused)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if n in stop or n in out or n.op in ("placeholder", "get_attr", "output"):
            continue
        out.append(n)
        todo.extend(n.all_input_nodes)
    return out


# ----------------------------------------------------------------------------- masks

_LE = {operator.le, torch.le}
_GE = {operator.ge, torch.ge}
_GT = {operator.gt, torch.gt}
_LT = {operator.lt, torch.lt}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not}
_SUB = {operator.sub, torch.sub}
_NEG_INF = -1e30  # an additive or filled mask value at most this is "never attend"


def _known_zero(a: Any) -> bool:
    """0, or a symbolic size Dynamo's guards prove is 0 (Hugging Face's sliding-window
    key offset `max(length - window + 1, 0)` while the cache is not full)."""
    if _const(a) is not None:
        return _const(a) == 0
    value = example(a)
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(value == 0))
    return False


def _is_arange(n: Any) -> Optional[int]:
    """S when n is arange(S) (or arange(0, S)), maybe plus a known 0; else None."""
    if is_add(n):
        zeros = [a for a in n.args if _known_zero(a)]
        rest = [a for a in n.args if not _known_zero(a)]
        if len(zeros) != 1 or len(rest) != 1:
            return None
        n = rest[0]
    n = _strip(n)
    if not is_call(n, {torch.arange}):
        return None
    args = n.args
    if len(args) == 1 and isinstance(args[0], int):
        return args[0]
    if len(args) == 2 and args[0] == 0 and isinstance(args[1], int):
        return args[1]
    return None


def _ascending_arange(n: Any) -> bool:
    """arange(T), arange(a, b) or arange(a, b, step > 0)."""
    if not is_call(n, {torch.arange}):
        return False
    step = node_arg(n, 2, "step", 1)
    return isinstance(step, (int, float)) and step > 0


def _increasing(p: fx.Node) -> bool:
    """Positions that are an ascending `arange` plus a scalar offset, or a graph input
    (the caller's positions, increasing by the kernel's contract, as `generate` passes
    them)."""
    p = _strip(p)
    if p.op == "placeholder":
        return True
    if is_add(p):
        a, b = p.args
        for r, offset in ((a, b), (b, a)):
            scalar = _const(offset) is not None or isinstance(example(offset), torch.SymInt) or \
                (shape_dtype(offset) is not None and shape_dtype(offset)[0] == ())
            if scalar and _ascending_arange(_strip(r)):
                return True
        return False
    return _ascending_arange(p)


class _Mask:
    """A recognised position mask: query positions P (1-D node), key length S, window."""

    def __init__(self) -> None:
        self.pos: Optional[fx.Node] = None
        self.keys: Optional[int] = None
        self.causal = False
        self.window: Optional[int] = None

    def key_axis(self, n: Any, mask: fx.Node) -> bool:
        base = _unbroadcast(n)
        s = _is_arange(base)
        if s is None or not _unit_except(n, (s,)) or not same_dims(shape_dtype(mask)[0][-1], s) \
                or self.keys not in (None, s):
            return False
        self.keys = s
        return True

    def query_axis(self, n: Any, mask: fx.Node) -> bool:
        base = _strip(_unbroadcast(n))
        sd = shape_dtype(base)
        if sd is None or len(sd[0]) != 1 or sd[1].is_floating_point or sd[1] == torch.bool:
            return False
        t = sd[0][0]
        if not _unit_except(n, (t, 1)) or not same_dims(shape_dtype(mask)[0][-2], t) or self.pos not in (None, base):
            return False
        self.pos = base
        return True

    def term(self, t: fx.Node, mask: fx.Node) -> bool:
        """`K <= Q` (causal) or `K > Q - W` (window W)."""
        if is_call(t, _LE, ("le", "__le__")) or is_call(t, _GE, ("ge", "__ge__")):
            k, q = t.args[:2] if is_call(t, _LE, ("le", "__le__")) else reversed(t.args[:2])
            if self.key_axis(k, mask) and self.query_axis(q, mask):
                self.causal = True
                return True
            return False
        if is_call(t, _GT, ("gt", "__gt__")) or is_call(t, _LT, ("lt", "__lt__")):
            k, qw = t.args[:2] if is_call(t, _GT, ("gt", "__gt__")) else reversed(t.args[:2])
            if not is_call(qw, _SUB, ("sub", "__sub__")) or not isinstance(qw.args[1], int) or qw.args[1] < 1:
                return False
            if self.window not in (None, qw.args[1]):
                return False
            if self.key_axis(k, mask) and self.query_axis(qw.args[0], mask):
                self.window = qw.args[1]
                return True
        return False


def _conjuncts(n: Any) -> Optional[list[fx.Node]]:
    n = _unbroadcast(n)
    if not isinstance(n, fx.Node):
        return None
    if is_call(n, _AND, ("__and__", "logical_and", "bitwise_and", "__rand__")):
        a, b = _conjuncts(n.args[0]), _conjuncts(n.args[1])
        return None if a is None or b is None else a + b
    sd = shape_dtype(n)
    if n.op == "call_method" and n.target == "new_ones" and n.kwargs.get("dtype") == torch.bool:
        return []  # an all-true start (Hugging Face's mask builder)
    if is_call(n, {torch.ones}) and n.kwargs.get("dtype") == torch.bool and sd is not None:
        return []
    return [n]


def position_mask(mask: Any) -> Union[_Mask, str]:
    """The recognised boolean position mask (True = attend), or why it is not one."""
    if not isinstance(mask, fx.Node):
        return "no mask"
    sd = shape_dtype(mask)
    if sd is None or sd[1] != torch.bool:
        return "the mask is not boolean"
    terms = _conjuncts(mask)
    found = _Mask()
    if terms is None or not terms or not all(found.term(t, mask) for t in terms):
        return ("the mask is not a causal (optionally sliding-window) mask of key slots arange(S) "
                "against query positions (a padding or custom mask, or a rolled cache)")
    if not found.causal:
        return "the mask has no causal term"
    if not _increasing(found.pos):
        return "the query positions are not provably increasing (arange + offset, or a graph input)"
    return found


def _is_zero(n: Any) -> bool:
    if _const(n) is not None:
        return _const(n) == 0
    if isinstance(n, fx.Node) and (is_call(n, {torch.zeros, torch.zeros_like}) or
                                   (n.op == "call_method" and n.target in ("new_zeros", "zero_"))):
        return True
    return False


def _is_never(n: Any) -> bool:
    c = _const(n)
    return c is not None and c <= _NEG_INF


def _masked(x: Any) -> Optional[tuple[fx.Node, Any]]:
    """(scores, boolean mask node) when x applies a mask to scores: `s.masked_fill(~M, -inf)`,
    `where(M, s, -inf)`, or `s + where(M, 0, min)`."""
    if not isinstance(x, fx.Node):
        return None
    if x.op == "call_method" and x.target == "masked_fill" or is_call(x, {torch.masked_fill}):
        s, notm, val = x.args[:3]
        if _is_never(val) and is_call(notm, _NOT, ("__invert__", "logical_not", "bitwise_not")):
            return s, notm.args[0]
        return None
    if is_call(x, {torch.where}, ("where",)) and len(x.args) == 3:
        m, s, val = x.args
        return (s, m) if _is_never(val) else None
    if is_add(x):
        for s, add in (x.args, tuple(reversed(x.args))):
            if is_call(add, {torch.where}) and len(add.args) == 3 and _is_zero(add.args[1]) and _is_never(add.args[2]):
                return s, add.args[0]
    return None


def _sdpa_mask(m: Any) -> Any:
    """The boolean mask behind SDPA's attn_mask (boolean, or additive where(M, 0, min))."""
    sd = shape_dtype(m)
    if sd is not None and sd[1].is_floating_point and is_call(m, {torch.where}) and len(m.args) == 3 \
            and _is_zero(m.args[1]) and _is_never(m.args[2]):
        return m.args[0]
    return m


# ----------------------------------------------------------------------------- attention

_SDPA = {torch.nn.functional.scaled_dot_product_attention}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax}
_MATMUL = {torch.matmul, operator.matmul}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout}


def _kv_source(view: GraphView, n: Any) -> tuple[Optional[fx.Node], Optional[int], Any, Optional[fx.Node]]:
    """(cache placeholder, repeat factor or None for none, the node read, per-KV-head scale
    placeholder or None) behind k or v: the cache itself or `cache[:B]`, maybe dequantized
    (`cache.float() * s.view(1, -1, 1, 1)`), maybe through `repeat_interleave(rep, dim=1)`
    or Hugging Face's `repeat_kv` (`c[:, :, None].expand(B, H, rep, S, D).reshape(B, H*rep,
    S, D)`), and casts."""
    cache, rep, read = _kv_source_plain(view, n)
    if cache is not None:
        return cache, rep, read, None
    if is_call(read, MUL_TARGETS, MUL_METHODS) and len(read.args) == 2:
        for a, b in (read.args, tuple(reversed(read.args))):
            scale = _head_scale(view, b)
            if scale is not None and isinstance(a, fx.Node):
                inner = _strip(a)
                cache = _cache(view, inner)
                if cache is not None:
                    return cache, rep, inner, scale
    return None, None, read, None


def _kv_source_plain(view: GraphView, n: Any) -> tuple[Optional[fx.Node], Optional[int], Any]:
    """_kv_source without dequantization: (cache, repeat factor, the node read)."""
    n = _strip(n)
    rep = None
    if is_call(n, {torch.repeat_interleave}, ("repeat_interleave",)):
        if node_arg(n, 2, "dim") not in (1, -3) or not isinstance(n.args[1], int):
            return None, None, n
        rep, n = n.args[1], _strip(n.args[0])
    elif n.op == "call_method" and n.target == "reshape" and is_call(n.args[0], set(), ("expand",)):
        ex = n.args[0]
        src = ex.args[0]
        idx = src.args[1] if src.op == "call_function" and src.target is operator.getitem else None
        ex_sd, sd = shape_dtype(ex), shape_dtype(n)
        if idx not in ((slice(None), slice(None), None, slice(None), slice(None)), (slice(None), slice(None), None)) \
                or ex_sd is None or sd is None or len(ex_sd[0]) != 5:
            return None, None, n
        b, h, r, s, d = ex_sd[0]
        if not all(isinstance(x, int) for x in (h, r)) or not same_dims(tuple(sd[0]), (b, h * r, s, d)):
            return None, None, n
        rep, n = r, _strip(src.args[0])
    return _cache(view, n), rep, n


def _scores(x: Any) -> Optional[tuple[fx.Node, Optional[float], float]]:
    """(q @ k^T node, softcap or None, scale) when x = softcap(scale * (q @ k^T))."""
    x = _strip(x)
    softcap = None
    if is_call(x, MUL_TARGETS, MUL_METHODS) and len(x.args) == 2:
        c = next((_const(a) for a in x.args if _const(a) is not None), None)
        t = next((a for a in x.args if isinstance(a, fx.Node)), None)
        if c is not None and is_call(t, {torch.tanh}, ("tanh",)):
            d = t.args[0]
            if not (is_call(d, {operator.truediv, torch.div}, ("div", "__truediv__")) and _const(d.args[1]) == c):
                return None
            softcap, x = c, _strip(d.args[0])
    scale = None
    if is_call(x, MUL_TARGETS, MUL_METHODS) and len(x.args) == 2:
        scale = next((_const(a) for a in x.args if _const(a) is not None), None)
        x = next((a for a in x.args if isinstance(a, fx.Node)), None)
    elif is_call(x, {operator.truediv, torch.div}, ("div", "__truediv__")) and _const(x.args[1]):
        scale, x = 1.0 / _const(x.args[1]), x.args[0]
    mm = _strip(x)
    if scale is None or not is_call(mm, _MATMUL, ("matmul", "__matmul__")):
        return None
    return mm, softcap, scale


def _key_of(kt: Any) -> Optional[fx.Node]:
    """k when kt = k.transpose(-2, -1) of a 4-D k."""
    if isinstance(kt, fx.Node) and kt.op == "call_method" and kt.target == "transpose":
        sd = shape_dtype(kt.args[0])
        dims = {d % 4 for d in kt.args[1:3]} if sd is not None and len(sd[0]) == 4 else set()
        if dims == {2, 3}:
            return kt.args[0]
    return None


_NOT_CACHED = ("keys/values are not read from a static cache tensor (the cache is dynamic or absent, "
               "or the attention runs over this call's keys only)")


class AttentionPass(FusionPass):
    """SDPA or written-out attention over a static cache -> planlang::attention (see the
    module docstring for how a site is recognised)."""

    kind = "attention"

    def find(self, view: GraphView) -> list[Site]:
        return [s for _, s in self._candidates(view) if isinstance(s, Site)]

    def explain(self, view: GraphView) -> dict[str, str]:
        """Module path -> why the attention there is no site."""
        return {p: s for p, s in self._candidates(view) if isinstance(s, str)}

    def _candidates(self, view: GraphView) -> Iterator[tuple[str, Found]]:
        for n in view.graph.nodes:
            if is_call(n, _SDPA):
                yield node_module(n) or "", self._sdpa(view, n)
            elif is_call(n, _SOFTMAX, ("softmax",)):
                found = self._explicit(view, n)
                if found is not None:
                    yield node_module(n) or "", found

    def _site(self, view, q, k, v, out, mask_node, info, extra) -> Found:
        kc, krep, kread, kscale = _kv_source(view, k)
        vc, vrep, _, vscale = _kv_source(view, v)
        if kc is None or vc is None:
            return _NOT_CACHED
        if krep != vrep or kc is vc or (kscale is None) != (vscale is None):
            return "keys and values are read differently"
        q_sd, c_sd = shape_dtype(q), shape_dtype(kc)
        if q_sd is None or c_sd is None or len(q_sd[0]) != 4:
            return "q is not [B, H, T, D]"
        (b, hq, t, d), (bmax, hkv, s, dk) = q_sd[0], c_sd[0]
        if not all(isinstance(x, int) for x in (hq, d, hkv, s, dk)):
            return "symbolic head or cache sizes"
        if dk != d or hq % hkv or (krep is not None and krep * hkv != hq) or (hint(b) or 0) > bmax:
            return "q does not fit the cache's shape"
        if shape_dtype(vc)[1] != c_sd[1]:
            return "the key and value caches differ in dtype"
        if kscale is not None:
            if c_sd[1] not in _FP8_FORMATS:
                return "the cache is read times a per-head scale but is not an FP8 cache"
            if view.input_tensor(kscale).numel() != hkv:
                return "the cache's scales do not hold one value per KV head"
        elif c_sd[1] in _FP8_FORMATS:
            return "an FP8 cache read without its per-KV-head scale (cache.float() * scale[h])"
        elif q_sd[1] != c_sd[1]:
            return "q and the cache differ in dtype"
        if not same_dims((shape_dtype(kread) or ((None,),))[0][0], b):
            return "the cache is not read at the batch's rows"
        mask = position_mask(mask_node)
        if isinstance(mask, str):
            return mask
        if mask.keys != s:
            return f"the mask covers {mask.keys} key slots, the cache {s}"
        psd = shape_dtype(mask.pos)
        if psd is None or not same_dims(psd[0][0], t):
            return "the mask's query positions do not match the queries"
        path = node_module(out) or ""
        return Site(self.kind, path, (path,),
                    {"q": _bthd(q), "q_bhtd": q, "k_cache": kc, "v_cache": vc, "pos": mask.pos, "out": out,
                     "k_scale": kscale, "v_scale": vscale, **extra},
                    {"window": mask.window, "causal": True, **info})

    def _sdpa(self, view: GraphView, n: fx.Node) -> Found:
        q, k, v = n.args[:3]
        mask = node_arg(n, 3, "attn_mask")
        if _kv_source(view, k)[0] is None:
            return _NOT_CACHED
        if _const(node_arg(n, 4, "dropout_p", 0.0)):
            return "dropout"
        if node_arg(n, 5, "is_causal", False):
            return ("is_causal=True aligns the mask to the top-left of the keys; only an explicit "
                    "position mask over the cache says which slots a query sees")
        scale = node_arg(n, 6, "scale")
        if mask is None:
            return "no attention mask: every cache slot would be attended"
        return self._site(view, q, k, v, n, _sdpa_mask(mask),
                          {"softcap": None, "sinks": False, "scale": scale, "form": "sdpa"},
                          {"sinks": None})

    def _explicit(self, view: GraphView, sm: fx.Node) -> Optional[Found]:
        """Written-out attention around a softmax; None when the softmax is not attention-like."""
        if not _last_dim(sm, node_arg(sm, 1, "dim")):
            return None
        # forward: [drop the sink column], casts, dropout(p=0) -> @ v
        p, sink_slice = sm, None
        chain = []
        while True:
            users = list(p.users)
            if len(users) != 1:
                return None
            p = users[0]
            chain.append(p)
            if p.target is operator.getitem and sink_slice is None and \
                    p.args[1] in ((Ellipsis, slice(None, -1)), (Ellipsis, slice(None, -1, None))):
                sink_slice = p
            elif p.op == "call_method" and p.target in _CASTS:
                pass
            elif is_call(p, _DROPOUT):
                if _const(node_arg(p, 1, "p", 0.5)) and node_arg(p, 2, "training", True):
                    return None
            else:
                break
        prev = chain[-2] if len(chain) > 1 else sm
        if not is_call(p, _MATMUL, ("matmul", "__matmul__")) or p.args[0] is not prev:
            return None
        v = p.args[1]
        x = _strip(sm.args[0])
        sink = None
        if is_call(x, {torch.cat}) and isinstance(x.args[0], (list, tuple)) and len(x.args[0]) == 2:
            x, sink_node = x.args[0]
            sink = self._sink_param(view, sink_node)
            if sink is None or sink_slice is None:
                return "a concatenated softmax column that is not a per-head sink parameter"
        elif sink_slice is not None:
            return None
        masked = _masked(_strip(x))
        if masked is None:
            return "the scores are not masked by a position mask before the softmax"
        scores, mask = masked
        found = _scores(scores)
        if found is None:
            return "the scores are not scale * q @ k^T (optionally soft-capped) before the mask"
        mm, softcap, scale = found
        q, kt = mm.args[:2]
        k = _key_of(kt)
        if k is None:
            return "the key operand is not k.transpose(-2, -1)"
        if sink is not None:
            hq = shape_dtype(q)[0][1] if shape_dtype(q) is not None else None
            if view.input_tensor(sink).numel() != hq:
                return "the sink parameter does not hold one logit per query head"
        return self._site(view, q, k, v, p, mask,
                          {"softcap": softcap, "sinks": sink is not None, "scale": scale, "form": "explicit"},
                          {"sinks": sink})

    @staticmethod
    def _sink_param(view: GraphView, n: Any) -> Optional[fx.Node]:
        while isinstance(n, fx.Node) and view.param(n) is None:
            ins = [a for a in n.all_input_nodes]
            if len(ins) != 1:
                return None
            n = ins[0]
        return n if isinstance(n, fx.Node) and view.param(n)[2].dim() == 1 else None

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        n, info = site.nodes, site.info
        out = n["out"]
        scale = info["scale"]
        if scale is None:  # SDPA's default: 1/sqrt(head size)
            scale = 1.0 / math.sqrt(view.input_tensor(n["k_cache"]).shape[-1])
        with g.inserting_before(out):
            q = n["q"] if n["q"] is not None else g.call_method("transpose", (n["q_bhtd"], 1, 2))
            args = (q, n["k_cache"], n["v_cache"], n["pos"], float(scale), info["softcap"],
                    n["sinks"], info["window"], bool(info["causal"]))
            if n.get("k_scale") is not None:  # an FP8 cache: the kernel dequantizes
                args += (n["k_scale"], n["v_scale"])
            y = g.call_function(torch.ops.planlang.attention.default, args)
            y_t = g.call_method("transpose", (y, 1, 2))
        for x in (q, y):
            if x is not n["q"]:
                adopt(x, out, value=False)
        adopt(y_t, out)
        out.replace_all_uses_with(y_t)
        erase_unused(g, _ancestors_until(out, {n["q_bhtd"], n["k_cache"], n["v_cache"], n["pos"]}))
        return "attention"
