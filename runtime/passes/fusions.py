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

from .graph import (LINEAR_TARGETS, MUL_METHODS, MUL_TARGETS, GraphView, adopt, erase_unused, evaluate, is_add, is_call,
                    hint, is_inplace, node_module, same_dims, shape_dtype)


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
    """Concatenated weights built once at apply time. With `share` the parts become views
    into the fused tensor, so the model holds no second copy and still runs unplanned;
    without it (graphs handed to Inductor, which re-reads every parameter as the tensor
    Dynamo traced, offsets included) the parts stay as they were and the fused tensor is a
    copy."""

    def __init__(self, precision=None, share: bool = True) -> None:
        self.share = share                # parts become views of the fused tensor (no second copy)
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.part_rows: dict[tuple, list[int]] = {}   # fused key -> rows of each part
        self.precision = precision        # a passes.precision.PrecisionMap, or None
        self._prepared: dict[tuple, Any] = {}
        self.precision_log: dict[int, dict[str, tuple]] = {}  # rule -> path -> (dtype, kernel, kernels by rows)
        self.last_by_rows: dict[int, str] = {}

    def prepared(self, key: tuple, tensor: torch.Tensor, spec) -> Any:
        """`tensor` quantized or cast as precision `spec` says, made once per key (the
        parts of a fused weight each on their own: see `precision.prepare_weight`)."""
        k = (key, spec.numerics)
        if k not in self._prepared:
            from .precision import prepare_weight
            self._prepared[k] = prepare_weight(tensor, spec, self.part_rows.get(key))
        return self._prepared[k]

    def gemm_precision(self, paths, dtype):
        """(spec or None, None), or (None, why-skipped) when the parts of a fused GEMM disagree."""
        if not self.precision:
            return None, None
        return self.precision.fused(list(paths), dtype)

    def concat(self, model: torch.nn.Module, key: tuple, params: list[tuple[str, str]]) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors[key]
        mods = dict(model.named_modules())
        parts = [getattr(mods[m], n) for m, n in params]
        fused = torch.cat([p.detach() for p in parts], dim=0).contiguous()
        self.part_rows[key] = [p.shape[0] for p in parts]
        offset = 0
        for (m, n), p in zip(params, parts):
            rows = p.shape[0]
            if self.share:
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
    """One fusion kind: `find` its sites in a graph (pure), `rewrite` one of them."""

    kind = ""

    def find(self, view: GraphView) -> list[Site]:
        raise NotImplementedError

    def explain(self, view: GraphView) -> dict[str, str]:
        """Near misses: module path -> why a computation there that looks like this kind's
        site is not one (for the report of a rule that lost places). Empty by default."""
        return {}

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        """Replace the site in the graph; returns the kernel's name for the report."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- rmsnorm_residual

def _is_rsqrt(n) -> bool:
    return is_call(n, {torch.rsqrt}, {"rsqrt"})


def _is_mean(n) -> bool:
    return is_call(n, {torch.mean}, {"mean"})


# Norm-wise relative error within which a candidate must reproduce the kernel's definition.
_NORM_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_NORM_TOL_LOW = 3e-2  # bf16 / fp16: the model may round once more than the kernel does

# Ops that return a view of their first argument (an in-place add through one of them
# changes what later readers of the view see).
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                 "flatten", "unflatten", "narrow", "as_strided", "view_as", "t", "detach"}


def _read_after(a: fx.Node, at: fx.Node, order: dict) -> bool:
    """Whether `a` (or a view of it) is read after node `at` in graph order."""
    for u in a.users:
        if u is at:
            continue
        if order[u] > order[at]:
            return True
        is_view = (u.op == "call_method" and u.target in _VIEW_METHODS) or u.target is operator.getitem
        if is_view and _read_after(u, at, order):
            return True
    return False


class RMSNormResidualPass(FusionPass):
    """`s = a + b; h = rmsnorm(s)` -> planlang::rmsnorm_residual (returns s and h); a norm
    whose input is no such add -> planlang::rmsnorm.

    How a site is recognised (never by class or attribute names):
    1. a module's own nodes (its scope) read exactly one tensor x from outside and one
       parameter w of shape [D] (D = x's last dimension), contain `rsqrt` and `mean`, and
       exactly one of them is used outside the scope (the output h);
    2. eps is the constant added to the mean; offset a constant added to the weight
       (Gemma's `1 + w`); a norm without an eps constant is not taken;
    3. the scope is run on a random x with a non-zero mean (so LayerNorm, which subtracts
       it, cannot pass) and a random w, and must reproduce
       `rmsnorm_reference(x, w, eps, offset)` in x's dtype, within one rounding;
    4. x is a residual add when it is `a + b` (any spelling: `+`, `torch.add`, `+=`) of two
       tensors of x's shape and dtype. An in-place add (`h += out`) is taken only when
       the old `h` is no graph input and nothing reads it (or a view of it) afterwards.
    """

    kind = "rmsnorm_residual"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for path, nodes in view.scopes().items():
            site = self._norm_site(view, path, nodes)
            if site is not None:
                sites.append(site)
        return sites

    def _norm_site(self, view: GraphView, path: str, nodes: list[fx.Node]) -> Optional[Site]:
        if not any(_is_rsqrt(n) for n in nodes) or not any(_is_mean(n) for n in nodes):
            return None
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
            return None
        x, w = inputs[0], weights[0]
        w_tensor = view.param(w)[2]
        x_sd = shape_dtype(x)
        if x_sd is None or w_tensor.dim() != 1 or not x_sd[0] or not same_dims(w_tensor.shape[0], x_sd[0][-1]):
            return None
        eps, offset = self._constants(nodes, {w})
        if eps is None or not self._computes_rmsnorm(nodes, x, w, outputs[0], x_sd, w_tensor, eps, offset):
            return None
        return Site(self.kind, path, (path,), {"input": x, "weight": w, "output": outputs[0], "scope": nodes},
                    {"eps": eps, "offset": offset, "residual": self._residual(view, x), "dim": w_tensor.shape[0]})

    @staticmethod
    def _constants(nodes, weights) -> tuple[Optional[float], float]:
        """eps is the constant added to the mean of squares; offset the one added to the weight."""
        eps, offset = None, 0.0
        for n in nodes:
            if not is_add(n):
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

    @staticmethod
    def _computes_rmsnorm(nodes, x, w, out, x_sd, w_tensor, eps, offset) -> bool:
        """Run the scope on random data and compare with the kernel's definition."""
        from ..kernels.rmsnorm_residual import rmsnorm_reference
        shape, dtype = [hint(d) for d in x_sd[0]], x_sd[1]  # symbolic sizes: their example values
        if any(d is None for d in shape) or not dtype.is_floating_point:
            return False
        gen = torch.Generator(device="cpu").manual_seed(1234)
        device = w_tensor.device
        xs = (torch.randn(shape, generator=gen) + 2.0).to(device=device, dtype=dtype)
        ws = (torch.rand(w_tensor.shape, generator=gen) + 0.5).to(device=device, dtype=w_tensor.dtype)
        try:
            with torch.no_grad():
                got = evaluate(nodes, {x: xs, w: ws})[out]
        except Exception:  # a node we cannot replay: not a site we can vouch for
            return False
        if not isinstance(got, torch.Tensor) or got.dtype != dtype or tuple(got.shape) != tuple(shape):
            return False
        want = rmsnorm_reference(xs, ws, eps, offset)
        err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
        return bool(err <= _NORM_TOL.get(dtype, _NORM_TOL_LOW))

    @staticmethod
    def _residual(view: GraphView, x: fx.Node) -> bool:
        """Whether the norm's input is a residual add the fused kernel can take over."""
        if not is_add(x) or len(x.all_input_nodes) != 2 or any(not isinstance(a, fx.Node) for a in x.args[:2]):
            return False
        a, b = x.args[:2]
        sa, sb, sx = shape_dtype(a), shape_dtype(b), shape_dtype(x)
        if sa is None or sb is None or sx is None or not (sa[1] == sb[1] == sx[1]):
            return False
        if not (same_dims(sa[0], sx[0]) and same_dims(sb[0], sx[0])):
            return False
        if is_inplace(x):
            order = {n: i for i, n in enumerate(view.graph.nodes)}
            if a.op == "placeholder" or _read_after(a, x, order):
                return False
        return True

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
            adopt(fused, out, value=False)
            adopt(s, x)
            adopt(h, out)
            out.replace_all_uses_with(h)
            x.replace_all_uses_with(s)
            erase_unused(g, list(reversed(site.nodes["scope"])) + [x])
            return "rmsnorm_residual"
        with g.inserting_after(out):
            h = g.call_function(torch.ops.planlang.rmsnorm.default, (x, w, eps, offset))
        adopt(h, out)
        out.replace_all_uses_with(h)
        erase_unused(g, list(reversed(site.nodes["scope"])))
        return "rmsnorm"


# ----------------------------------------------------------------------------- linears

def _linears(view: GraphView) -> list[fx.Node]:
    return [n for n in view.graph.nodes if is_call(n, LINEAR_TARGETS) and view.linear_weight(n) is not None]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


_SILU = {torch.nn.functional.silu} | ({torch._C._nn.silu} if hasattr(torch._C._nn, "silu") else set())
_GELU = {torch.nn.functional.gelu, torch._C._nn.gelu}
_SIGMOID = {torch.sigmoid, torch.nn.functional.sigmoid}


def _act_of(n) -> Optional[tuple[str, fx.Node, list]]:
    """(act name, its input, the nodes computing it) when n is silu(g) (also written
    `g * sigmoid(g)`) or tanh-approximated gelu(g); else None."""
    if is_call(n, _SILU, ("silu",)):
        return "silu", n.args[0], [n]
    if is_call(n, _GELU, ("gelu",)):
        approximate = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
        return ("gelu_tanh", n.args[0], [n]) if approximate == "tanh" else None
    if is_call(n, MUL_TARGETS, MUL_METHODS) and len(n.args) == 2:
        for g, sig in (n.args, tuple(reversed(n.args))):
            if is_call(sig, _SIGMOID, ("sigmoid",)) and sig.args[0] is g and len(sig.users) == 1:
                return "silu", g, [n, sig]
    return None


class SwiGLUPass(FusionPass):
    """`act(x W1) * (x W3)` -> planlang::swiglu_linear(x, [W1; W3], act).

    How a site is recognised: a product (either order) of an activation of one linear and
    a second linear on the same input x; the activation is silu (`F.silu`, or written
    `g * sigmoid(g)`) or tanh-approximated gelu (Gemma's GeGLU); both linears have no bias,
    weights of one shape and dtype, and no other reader (the fused op replaces them).
    The site's place is the module holding the gate linear (`layers.0.mlp`).
    """

    kind = "swiglu"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for n in view.graph.nodes:
            if not is_call(n, MUL_TARGETS, MUL_METHODS) or len(n.args) != 2 or n.kwargs:
                continue
            site = None
            for act_node, up in (n.args, tuple(reversed(n.args))):
                site = site or self._site(view, n, act_node, up)
            if site is not None:
                sites.append(site)
        return sites

    def _site(self, view: GraphView, mul: fx.Node, act_node: Any, up: Any) -> Optional[Site]:
        found = _act_of(act_node)
        if found is None or not is_call(up, LINEAR_TARGETS):
            return None
        act, gate, act_nodes = found
        if not is_call(gate, LINEAR_TARGETS) or gate.args[0] is not up.args[0]:
            return None
        wg, wu = view.linear_weight(gate), view.linear_weight(up)
        if wg is None or wu is None or wg[2] is not None or wu[2] is not None:
            return None
        if wg[1].shape != wu[1].shape or wg[1].dtype != wu[1].dtype:
            return None
        gate_readers = set(gate.users) - set(act_nodes)
        if len(act_node.users) != 1 or gate_readers or len(up.users) != 1:
            return None
        return Site(self.kind, _parent(wg[0]), (wg[0], wu[0]),
                    {"x": gate.args[0], "gate": gate, "up": up, "act": act_nodes, "mul": mul},
                    {"act": act, "ffn": wg[1].shape[0], "dim": wg[1].shape[1]})

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        g = view.graph
        gate, up = site.nodes["gate"], site.nodes["up"]
        wg, wu = view.linear_weight(gate), view.linear_weight(up)
        spec, why = weights.gemm_precision(site.members, wg[1].dtype)
        if why:
            return why
        w13 = weights.concat(view.model, site.key, [(wg[0], "weight"), (wu[0], "weight")])
        if spec is not None:
            from .precision import emit_gemm, record
            out = emit_gemm(view, site.nodes["mul"], site.nodes["x"], w13, None, site.key, spec, weights,
                            lambda xc, wn, bc: g.call_function(torch.ops.planlang.swiglu_linear.default,
                                                               (xc, wn, site.info["act"])),
                            act=site.info["act"])
            kernel = weights.prepared(site.key, w13, spec).kernel
            record(weights, site.members, spec, kernel, weights.last_by_rows)
        else:
            w_node = _get_attr(view, site.key, w13, site.nodes["mul"])
            with g.inserting_before(site.nodes["mul"]):
                out = g.call_function(torch.ops.planlang.swiglu_linear.default,
                                      (site.nodes["x"], w_node, site.info["act"]))
            kernel = "swiglu_linear"
        adopt(out, site.nodes["mul"])
        site.nodes["mul"].replace_all_uses_with(out)
        erase_unused(g, [site.nodes["mul"], *site.nodes["act"], gate, up])
        return kernel if kernel == "swiglu_linear" else f"swiglu via {kernel}"


class QKVPass(FusionPass):
    """Three linears of one input in one module -> one GEMM on the concatenated weight,
    then split (views).

    How a site is recognised: exactly three linear calls on parameters, each of a
    different module, read the same input node, and their modules share one parent (the
    attention block, whose path is the site's place); the weights agree on the input size
    and dtype, and either all three have a bias (Qwen2) or none has.
    """

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
            if len({w[0] for w in ws}) != 3:  # one module called thrice is no q/k/v triple
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
        spec, why = weights.gemm_precision(site.members, ws[0][1].dtype)
        if why:
            return why
        w = weights.concat(view.model, site.key, [(p, "weight") for p, _, _ in ws])
        first = min(nodes, key=lambda n: list(g.nodes).index(n))
        b_node = None
        if site.info["bias"]:
            b = weights.concat(view.model, site.key + ("bias",), [(p, "bias") for p, _, _ in ws])
            b_node = _get_attr(view, site.key + ("bias",), b, first)
        kernel = "qkv_linear"
        if spec is not None:
            from .precision import emit_gemm, record
            y = emit_gemm(view, first, site.nodes["x"], w, b_node, site.key, spec, weights,
                          lambda xc, wn, bc: g.call_function(torch.ops.planlang.qkv_linear.default, (xc, wn, bc)))
            kernel = weights.prepared(site.key, w, spec).kernel
            record(weights, site.members, spec, kernel, weights.last_by_rows)
            kernel = f"qkv via {kernel}"
        else:
            w_node = _get_attr(view, site.key, w, first)
            with g.inserting_before(first):
                y = g.call_function(torch.ops.planlang.qkv_linear.default, (site.nodes["x"], w_node, b_node))
        with g.inserting_before(first):
            parts = g.call_function(torch.split, (y, site.info["sizes"]), {"dim": -1})
            outs = [g.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for n in (y, parts):
            adopt(n, first, value=False)
        for n, o in zip(nodes, outs):
            adopt(o, n)
        for n, o in zip(nodes, outs):
            n.replace_all_uses_with(o)
        erase_unused(g, nodes)
        return kernel


def explain_misses(views: list[GraphView], kind: str, selects) -> dict[str, str]:
    """Over all captured graphs: module path -> why the `kind` pass found no site there,
    for the paths `selects(path)` accepts and where no graph has a site."""
    fusion = PASSES.get(kind) or _all_passes()[kind]
    found = {s.path for v in views for s in fusion.find(v)}
    out: dict[str, str] = {}
    for view in views:
        for path, why in fusion.explain(view).items():
            if path not in found and selects(path):
                out.setdefault(path, why)
    return out


def _all_passes() -> dict[str, FusionPass]:
    from .attention import AttentionPass, RopeKVCachePass
    return {p.kind: p for p in (RMSNormResidualPass(), SwiGLUPass(), QKVPass(), RopeKVCachePass(), AttentionPass())}


PASSES: dict[str, FusionPass] = {}
