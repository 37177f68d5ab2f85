"""Passes for the attention block: `rope_kvcache` and `attention`.

Both find their sites by the computation around a static KV cache:
- the cache write is `cache[:B].index_copy_(2, pos, x)` on a buffer (gpt-fast, the built-in
  models and Hugging Face's StaticCache all write this way); `pos` is the position tensor;
- rotary embedding is `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`
  and `cos = table[pos]`;
- attention is `scaled_dot_product_attention(q, k, v, ...)` or its written-out form
  `softmax(softcap(q k^T * scale) masked [, sink]) @ v`, with k and v read from the cache
  (through `repeat_interleave` for grouped-query attention).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .fusions import FusedWeights, FusionPass, Site, _const, erase_unused
from .graph import ADD_TARGETS, MUL_TARGETS, GraphView, is_call, node_module

_TO = {"to", "float", "type_as", "contiguous", "bfloat16", "half"}


def _strip(n: Any, methods=_TO) -> Any:
    """Walk back through dtype casts and contiguous copies."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in methods:
        n = n.args[0]
    return n


def _index_copies(view: GraphView) -> list[fx.Node]:
    return [n for n in view.graph.nodes
            if (n.op == "call_method" and n.target == "index_copy_")
            or (n.op == "call_function" and getattr(n.target, "__name__", "") == "index_copy_")]


def _cache_of(view: GraphView, n: Any) -> Optional[fx.Node]:
    """The cache buffer placeholder behind `buffer[:B]` (or the buffer itself)."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem:
        idx = n.args[1]
        first = idx[0] if isinstance(idx, tuple) else idx
        if isinstance(first, slice) and first.start in (None, 0) and first.step in (None, 1):
            n = n.args[0]
    p = view.param(n)
    return n if p is not None and p[2].dim() == 4 else None


def _rotate_half_input(n: Any) -> Optional[fx.Node]:
    """x when n is cat([-x2, x1], -1) with x1, x2 the two halves of x."""
    if not is_call(n, {torch.cat}) or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
        return None
    neg, x1 = n.args[0]
    if not is_call(neg, {operator.neg, torch.neg}, {"neg", "__neg__"}):
        return None
    x2 = neg.args[0]
    for half, want in ((x1, 0), (x2, 1)):
        if not (isinstance(half, fx.Node) and half.target is operator.getitem and half.args[1] == want):
            return None
    if x1.args[0] is not x2.args[0]:
        return None
    chunk = x1.args[0]
    if is_call(chunk, {torch.chunk}, {"chunk"}):
        return chunk.args[0]
    return None


def _rope(n: Any) -> Optional[dict]:
    """{x, cos, sin} when n is x * cos + rotate_half(x) * sin."""
    if not is_call(n, ADD_TARGETS, {"add", "__add__"}) or len(n.args) != 2:
        return None
    a, b = n.args
    for m1, m2 in ((a, b), (b, a)):
        if not (is_call(m1, MUL_TARGETS, {"mul"}) and is_call(m2, MUL_TARGETS, {"mul"})):
            return None
        for x, cos in (m1.args, reversed(m1.args)):
            for rh, sin in (m2.args, reversed(m2.args)):
                if _rotate_half_input(rh) is x and isinstance(x, fx.Node):
                    return {"x": x, "cos": cos, "sin": sin}
    return None


def _table(view: GraphView, n: Any) -> Optional[tuple[fx.Node, fx.Node]]:
    """(table placeholder, position node) when n is table[pos] (maybe cast)."""
    n = _strip(n)
    if isinstance(n, fx.Node) and n.target is operator.getitem and isinstance(n.args[1], fx.Node):
        table = n.args[0]
        if view.param(table) is not None and view.param(table)[2].dim() == 2:
            return table, n.args[1]
    return None


def _bthd(x: fx.Node) -> Optional[fx.Node]:
    """The [B, T, H, D] tensor that x = y.transpose(1, 2) came from."""
    if x.op == "call_method" and x.target == "transpose" and tuple(x.args[1:]) in ((1, 2), (2, 1)):
        return x.args[0]
    return None


class RopeKVCachePass(FusionPass):
    """q, k rotation + the cache write of k and v -> planlang::rope_kvcache."""

    kind = "rope_kvcache"

    def find(self, view: GraphView) -> list[Site]:
        writes = _index_copies(view)
        by_module: dict[str, list[fx.Node]] = {}
        for w in writes:
            if len(w.args) >= 4 and w.args[1] == 2:
                by_module.setdefault(node_module(w) or "", []).append(w)
        sites = []
        for path, ws in by_module.items():
            if len(ws) != 2:
                continue
            roped = [(_rope(_strip(w.args[3])), w) for w in ws]
            krope = [(r, w) for r, w in roped if r is not None]
            if len(krope) != 1:
                continue
            (rk, kw), = krope
            vw = next(w for w in ws if w is not kw)
            pos = kw.args[2]
            if vw.args[2] is not pos:
                continue
            kc, vc = _cache_of(view, kw.args[0]), _cache_of(view, vw.args[0])
            tc, ts = _table(view, rk["cos"]), _table(view, rk["sin"])
            if kc is None or vc is None or tc is None or ts is None or tc[1] is not pos or ts[1] is not pos:
                continue
            k_in, v_in = _bthd(rk["x"]), _bthd(_strip(vw.args[3]))
            # the query rotation: the other rope on the same cos/sin
            qrope = [n for n in view.graph.nodes if n is not _strip(kw.args[3]) and node_module(n) == path
                     and (r := _rope(n)) is not None and _table(view, r["cos"]) == tc and _table(view, r["sin"]) == ts]
            if k_in is None or v_in is None or len(qrope) != 1:
                continue
            q_in = _bthd(_rope(qrope[0])["x"])
            if q_in is None:
                continue
            attn_path = path.rpartition(".")[0] if path.endswith("kv_cache") else path
            sites.append(Site(self.kind, attn_path, (attn_path,),
                              {"q": q_in, "k": k_in, "v": v_in, "cos": tc[0], "sin": ts[0], "pos": pos,
                               "k_cache": kc, "v_cache": vc, "q_rope": qrope[0], "k_rope": _strip(kw.args[3]),
                               "k_write": kw, "v_write": vw}, {}))
        return sites

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        n = site.nodes
        order = {node: i for i, node in enumerate(g.nodes)}
        inputs = [n[k] for k in ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "pos")]
        last = max(inputs, key=order.__getitem__)
        first_user = min((u for u in n["q_rope"].users), key=order.__getitem__, default=None)
        if first_user is not None and order[first_user] <= order[last]:
            return "skipped: the query rotation is used before the cache inputs exist"
        with g.inserting_before(last.next):  # (inserting_after would reverse the three nodes)
            fused = g.call_function(torch.ops.planlang.rope_kvcache.default, tuple(inputs))
            q_rot = g.call_function(operator.getitem, (fused, 0))
            q_new = g.call_method("transpose", (q_rot, 1, 2))
        for x in (fused, q_rot, q_new):
            x.meta["nn_module_stack"] = n["k_write"].meta.get("nn_module_stack")
        n["q_rope"].replace_all_uses_with(q_new)
        # The writes are now done by the fused op; their results (the cache views) stay.
        for w in (n["k_write"], n["v_write"]):
            w.replace_all_uses_with(w.args[0])
        erase_unused(g, [n["k_write"], n["v_write"]])
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


# ----------------------------------------------------------------------------- attention

_SDPA = {torch.nn.functional.scaled_dot_product_attention}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax}
_MATMUL = {torch.matmul, operator.matmul}


def _kv_source(view: GraphView, n: Any) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(cache placeholder, the cache view node) behind repeat_interleave/casts of k or v."""
    n = _strip(n)
    while isinstance(n, fx.Node) and (is_call(n, {torch.repeat_interleave}, {"repeat_interleave"})
                                      or (n.op == "call_method" and n.target in _TO)):
        n = n.args[0]
    return _cache_of(view, n), n


def _position_of(view: GraphView, cache: fx.Node) -> Optional[fx.Node]:
    """The position tensor with which the graph writes `cache`."""
    for n in view.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.planlang.rope_kvcache.default:
            if n.args[5] is cache or n.args[6] is cache:
                return n.args[7]
        if n in _index_copies(view) and _cache_of(view, n.args[0]) is cache:
            return n.args[2]
    return None


class AttentionPass(FusionPass):
    """SDPA or written-out attention over a static cache -> planlang::attention."""

    kind = "attention"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for n in view.graph.nodes:
            found = self._sdpa(view, n) if is_call(n, _SDPA) else None
            if found is None and is_call(n, _SOFTMAX, {"softmax"}):
                found = self._explicit(view, n)
            if found is not None:
                sites.append(found)
        return sites

    def _site(self, view, q, k, v, out, info, extra) -> Optional[Site]:
        kc, kview = _kv_source(view, k)
        vc, _ = _kv_source(view, v)
        if not isinstance(q, fx.Node) or kc is None or vc is None:
            return None
        q_in = _bthd(q)  # None: q is [B, H, T, D] made some other way; transposed at rewrite
        pos = _position_of(view, kc)
        if pos is None:
            return None
        path = node_module(out) or ""
        mod = dict(view.model.named_modules()).get(path)
        window = getattr(mod, "window", None) if mod is not None else None
        if window is None and mod is not None:
            window = getattr(mod, "sliding_window", None)
        info = {"window": window if isinstance(window, int) else None, **info}
        return Site(self.kind, path, (path,), {"q": q_in, "q_bhtd": q, "k_cache": kc, "v_cache": vc, "pos": pos, "out": out, **extra},
                    info)

    def _sdpa(self, view: GraphView, n: fx.Node) -> Optional[Site]:
        q, k, v = n.args[:3]
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        causal = n.kwargs.get("is_causal", False) or mask is not None
        scale = n.kwargs.get("scale")
        if n.kwargs.get("dropout_p", 0.0):
            return None
        return self._site(view, q, k, v, n, {"softcap": None, "sinks": False, "scale": scale, "causal": causal,
                                             "form": "sdpa"}, {"sinks": None, "remove": [n]})

    def _explicit(self, view: GraphView, sm: fx.Node) -> Optional[Site]:
        x = sm.args[0]
        sink = None
        remove = [sm]
        if is_call(x, {torch.cat}) and isinstance(x.args[0], (list, tuple)) and len(x.args[0]) == 2:
            x, sink_node = x.args[0]
            sink = self._sink_param(view, sink_node)
            if sink is None:
                return None
        causal = False
        if x.op == "call_method" and x.target == "masked_fill":
            causal, x = True, x.args[0]
        softcap = None
        if is_call(x, MUL_TARGETS, {"mul"}):
            c = next((_const(a) for a in x.args if _const(a) is not None), None)
            t = next((a for a in x.args if isinstance(a, fx.Node)), None)
            if c is not None and is_call(t, {torch.tanh}, {"tanh"}) and is_call(t.args[0], {operator.truediv, torch.div}, {"div"}):
                softcap, x = c, t.args[0].args[0]
        if not is_call(x, MUL_TARGETS, {"mul"}):
            return None
        scale = next((_const(a) for a in x.args if _const(a) is not None), None)
        mm = _strip(next((a for a in x.args if isinstance(a, fx.Node)), None))
        if scale is None or not is_call(mm, _MATMUL, {"matmul", "__matmul__"}):
            return None
        q, kt = mm.args
        if not (isinstance(kt, fx.Node) and kt.op == "call_method" and kt.target == "transpose"):
            return None
        k = kt.args[0]
        # forward: [drop the sink column], cast, @ v
        p = next(iter(sm.users), None) if len(sm.users) == 1 else None
        if sink is not None:
            if not (isinstance(p, fx.Node) and p.target is operator.getitem):
                return None
            p = next(iter(p.users), None) if len(p.users) == 1 else None
        while isinstance(p, fx.Node) and p.op == "call_method" and p.target in _TO and len(p.users) == 1:
            p = next(iter(p.users))
        if not is_call(p, _MATMUL, {"matmul", "__matmul__"}):
            return None
        v = p.args[1]
        return self._site(view, q, k, v, p, {"softcap": softcap, "sinks": sink is not None, "scale": scale,
                                             "causal": causal, "form": "explicit"}, {"sinks": sink, "remove": [p, sm, mm]})

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
            scale = view.param(n["k_cache"])[2].shape[-1] ** -0.5
        with g.inserting_before(out):
            q = n["q"] if n["q"] is not None else g.call_method("transpose", (n["q_bhtd"], 1, 2))
            y = g.call_function(torch.ops.planlang.attention.default,
                                (q, n["k_cache"], n["v_cache"], n["pos"], float(scale), info["softcap"],
                                 n["sinks"], info["window"], bool(info["causal"])))
            y_t = g.call_method("transpose", (y, 1, 2))
        for x in (y, y_t):
            x.meta["nn_module_stack"] = out.meta.get("nn_module_stack")
        out.replace_all_uses_with(y_t)
        erase_unused(g, _ancestors_until(out, {n["q_bhtd"], n["k_cache"], n["v_cache"], n["pos"]}))
        return "attention"
