"""Fusion passes: find each fusion kind's sites by the computation, then rewrite them.

A pass never looks at class or attribute names. It reads the captured graph (see
`graph.py`): three linears on one input are a `qkv` site; `act(x W1) * (x W3)` is a
`swiglu` site; a module whose scope computes `x * rsqrt(mean(x^2) + eps) * w` on one input
is an RMSNorm, and when that input is `a + b` the pair is a `rmsnorm_residual` site. Sites
are found first (`find`, pure), so a required rule that finds nothing fails before the
model is touched; `rewrite` then replaces each site with a `planlang::` custom op.

Adding a fusion kind: write a `FusionPass` subclass with `find` (return `Site`s naming
the module paths they cover) and `rewrite`, add it to `PASSES` in the order it must run,
and give its kernel a reference and a Triton version in `runtime/kernels/`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph import ADD_TARGETS, LINEAR_TARGETS, MUL_TARGETS, GraphView, erase_unused, is_call, node_module


@dataclass
class Site:
    """One place a fusion applies: its module path(s) and the graph nodes it replaces."""

    kind: str
    path: str                       # the module the site belongs to (selectors match this)
    members: tuple[str, ...]        # module paths the site covers (all must be selected)
    nodes: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.kind, self.members)


class FusedWeights:
    """Concatenated weights built once at apply time. The parts become views into the
    fused tensor, so the model holds no second copy and still runs unplanned."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def concat(self, model: torch.nn.Module, key: tuple, params: list[tuple[str, str]]) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors[key]
        mods = dict(model.named_modules())
        parts = [getattr(mods[m], n) for m, n in params]
        fused = torch.cat([p.detach() for p in parts], dim=0).contiguous()
        offset = 0
        for (m, n), p in zip(params, parts):
            rows = p.shape[0]
            p.data = fused[offset: offset + rows]
            offset += rows
        self.tensors[key] = fused
        return fused


def _const(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _attr_name(key: tuple) -> str:
    return "planlang_" + "_".join(str(abs(hash(key)) % (1 << 40)).split())


def _get_attr(view: GraphView, key: tuple, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    name = _attr_name(key)
    if not hasattr(view.gm, name):
        view.gm.register_buffer(name, tensor, persistent=False)
    with view.graph.inserting_before(before):
        return view.graph.get_attr(name)


class FusionPass:
    kind = ""

    def find(self, view: GraphView) -> list[Site]:
        raise NotImplementedError

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        """Replace the site in the graph; returns the kernel's name for the report."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- rmsnorm_residual

def _is_rsqrt(n) -> bool:
    return is_call(n, {torch.rsqrt}, {"rsqrt"})


def _is_mean(n) -> bool:
    return is_call(n, {torch.mean}, {"mean"})


class RMSNormResidualPass(FusionPass):
    """`s = a + b; h = rmsnorm(s)` -> planlang::rmsnorm_residual; a norm whose input is no
    add becomes planlang::rmsnorm (one kernel instead of six)."""

    kind = "rmsnorm_residual"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for path, nodes in view.scopes().items():
            if not any(_is_rsqrt(n) for n in nodes) or not any(_is_mean(n) for n in nodes):
                continue
            inside = set(nodes)
            inputs, weights = [], []
            for n in nodes:
                for a in n.all_input_nodes:
                    if a in inside:
                        continue
                    if view.param(a) is not None:
                        weights.append(a)
                    elif a not in inputs:
                        inputs.append(a)
            outputs = [n for n in nodes if any(u not in inside for u in n.users)]
            if len(inputs) != 1 or len(set(weights)) != 1 or len(outputs) != 1:
                continue
            eps, offset = self._constants(nodes, set(weights))
            if eps is None:
                continue
            x = inputs[0]
            residual = is_call(x, ADD_TARGETS, {"add", "__add__"}) and len(x.all_input_nodes) == 2 \
                and not any(_const(a) is not None for a in x.args)
            sites.append(Site(self.kind, path, (path,), {"input": x, "weight": weights[0], "output": outputs[0],
                                                         "scope": nodes},
                              {"eps": eps, "offset": offset, "residual": residual,
                               "dim": view.param(weights[0])[2].shape[-1]}))
        return sites

    @staticmethod
    def _constants(nodes, weights) -> tuple[Optional[float], float]:
        """eps is the constant added to the mean of squares; offset the one added to the weight."""
        eps, offset = None, 0.0
        for n in nodes:
            if not is_call(n, ADD_TARGETS, {"add", "__add__", "__radd__"}):
                continue
            consts = [_const(a) for a in n.args if _const(a) is not None]
            others = [a for a in n.args if isinstance(a, fx.Node)]
            if len(consts) != 1 or len(others) != 1:
                continue
            src = others[0]
            if _is_mean(src):
                eps = consts[0]
            elif src in weights or any(w in src.all_input_nodes for w in weights):
                offset = consts[0]
        return eps, offset

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        x, w, out = site.nodes["input"], site.nodes["weight"], site.nodes["output"]
        eps, offset = site.info["eps"], site.info["offset"]
        if site.info["residual"]:
            a, b = x.args[0], x.args[1]
            with g.inserting_before(x):
                fused = g.call_function(torch.ops.planlang.rmsnorm_residual.default, (a, b, w, eps, offset))
                s = g.call_function(operator.getitem, (fused, 0))
                h = g.call_function(operator.getitem, (fused, 1))
            for n in (fused, s, h):
                n.meta["nn_module_stack"] = site.nodes["scope"][0].meta.get("nn_module_stack")
            out.replace_all_uses_with(h)
            x.replace_all_uses_with(s)
            erase_unused(g, list(reversed(site.nodes["scope"])) + [x])
            return "rmsnorm_residual"
        with g.inserting_after(out):
            h = g.call_function(torch.ops.planlang.rmsnorm.default, (x, w, eps, offset))
        out.replace_all_uses_with(h)
        erase_unused(g, list(reversed(site.nodes["scope"])))
        return "rmsnorm"


# ----------------------------------------------------------------------------- linears

def _linears(view: GraphView) -> list[fx.Node]:
    return [n for n in view.graph.nodes if is_call(n, LINEAR_TARGETS) and view.linear_weight(n) is not None]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


_ACTS = {"silu": ({torch.nn.functional.silu, torch._C._nn.silu if hasattr(torch._C._nn, "silu") else None}, ("silu",)),
         "gelu_tanh": ({torch.nn.functional.gelu, torch._C._nn.gelu}, ("gelu",))}


def _act_of(n) -> Optional[str]:
    if is_call(n, {t for t in _ACTS["silu"][0] if t is not None}, _ACTS["silu"][1]):
        return "silu"
    if is_call(n, _ACTS["gelu_tanh"][0], _ACTS["gelu_tanh"][1]):
        if n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh":
            return "gelu_tanh"
    return None


class SwiGLUPass(FusionPass):
    """`act(x W1) * (x W3)` -> planlang::swiglu_linear(x, [W1; W3], act)."""

    kind = "swiglu"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for n in view.graph.nodes:
            if not is_call(n, MUL_TARGETS, {"mul", "__mul__"}) or len(n.args) != 2:
                continue
            a, b = n.args
            for act_node, up in ((a, b), (b, a)):
                act = _act_of(act_node)
                if act is None or not is_call(up, LINEAR_TARGETS):
                    continue
                gate = act_node.args[0]
                if not is_call(gate, LINEAR_TARGETS) or gate.args[0] is not up.args[0]:
                    continue
                wg, wu = view.linear_weight(gate), view.linear_weight(up)
                if wg is None or wu is None or wg[2] is not None or wu[2] is not None:
                    continue
                if wg[1].shape != wu[1].shape or len(act_node.users) != 1 or len(gate.users) != 1 or len(up.users) != 1:
                    continue
                path = _parent(wg[0])
                sites.append(Site(self.kind, path, (wg[0], wu[0]),
                                  {"x": gate.args[0], "gate": gate, "up": up, "act": act_node, "mul": n},
                                  {"act": act, "ffn": wg[1].shape[0], "dim": wg[1].shape[1]}))
                break
        return sites

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        gate, up = site.nodes["gate"], site.nodes["up"]
        wg, wu = view.linear_weight(gate), view.linear_weight(up)
        w13 = weights.concat(view.model, site.key, [(wg[0], "weight"), (wu[0], "weight")])
        w_node = _get_attr(view, site.key, w13, site.nodes["mul"])
        with g.inserting_before(site.nodes["mul"]):
            out = g.call_function(torch.ops.planlang.swiglu_linear.default, (site.nodes["x"], w_node, site.info["act"]))
        out.meta["nn_module_stack"] = site.nodes["mul"].meta.get("nn_module_stack")
        site.nodes["mul"].replace_all_uses_with(out)
        erase_unused(g, [site.nodes["mul"], site.nodes["act"], gate, up])
        return "swiglu_linear"


class QKVPass(FusionPass):
    """Three linears of one input in one module -> one GEMM on the concatenated weight,
    then split (views)."""

    kind = "qkv"

    def find(self, view: GraphView) -> list[Site]:
        groups: dict[tuple, list[fx.Node]] = {}
        for n in _linears(view):
            path = view.linear_weight(n)[0]
            groups.setdefault((n.args[0], _parent(path)), []).append(n)
        sites = []
        for (x, parent), nodes in groups.items():
            if len(nodes) != 3:
                continue
            ws = [view.linear_weight(n) for n in nodes]
            if len({w[1].shape[1] for w in ws}) != 1 or len({w[1].dtype for w in ws}) != 1:
                continue
            if any((w[2] is None) != (ws[0][2] is None) for w in ws):
                continue
            sites.append(Site(self.kind, parent, tuple(w[0] for w in ws), {"x": x, "linears": nodes},
                              {"sizes": [w[1].shape[0] for w in ws], "bias": ws[0][2] is not None,
                               "dim": ws[0][1].shape[1]}))
        return sites

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        nodes = site.nodes["linears"]
        ws = [view.linear_weight(n) for n in nodes]
        w = weights.concat(view.model, site.key, [(p, "weight") for p, _, _ in ws])
        first = min(nodes, key=lambda n: list(g.nodes).index(n))
        w_node = _get_attr(view, site.key, w, first)
        b_node = None
        if site.info["bias"]:
            b = weights.concat(view.model, site.key + ("bias",), [(p, "bias") for p, _, _ in ws])
            b_node = _get_attr(view, site.key + ("bias",), b, first)
        with g.inserting_before(first):
            y = g.call_function(torch.ops.planlang.qkv_linear.default, (site.nodes["x"], w_node, b_node))
            parts = g.call_function(torch.split, (y, site.info["sizes"]), {"dim": -1})
            outs = [g.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for n in (y, parts, *outs):
            n.meta["nn_module_stack"] = first.meta.get("nn_module_stack")
        for n, o in zip(nodes, outs):
            n.replace_all_uses_with(o)
        erase_unused(g, nodes)
        return "qkv_linear"


def _all_passes() -> dict[str, FusionPass]:
    from .attention import AttentionPass, RopeKVCachePass
    return {p.kind: p for p in (RMSNormResidualPass(), SwiGLUPass(), QKVPass(), RopeKVCachePass(), AttentionPass())}


PASSES: dict[str, FusionPass] = {}
