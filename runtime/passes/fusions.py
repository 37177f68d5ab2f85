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
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from .graph import (LINEAR_TARGETS, MUL_METHODS, MUL_TARGETS, GraphView, adopt, erase_unused, evaluate, is_add, is_call,
                    hint, is_inplace, node_arg, node_module, same_dims, shape_dtype)


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


# ----------------------------------------------------------------------------- rope_kvcache

def _per_token(n: Any, x: Any) -> Optional[tuple[fx.Node, str]]:
    """(c, how) when n, the cos or sin a rotation of x [B, H, T, D] multiplies by, is a
    tensor of one row per token broadcast over the heads: n is [Bc, 1, T, D], [1, T, D] or
    [T, D] with Bc 1 or B. c is the node to read and `how` what turns it into the kernel's
    [Bc, T, D]: "" (c is that already: n itself, or n = c.unsqueeze(1) as Hugging Face
    writes it), "squeeze1" or "unsqueeze0"."""
    sx, sn = shape_dtype(x), shape_dtype(n)
    if sx is None or sn is None or len(sx[0]) != 4 or not sn[1].is_floating_point:
        return None
    (b, _, t, d), shape = sx[0], tuple(sn[0])
    if len(shape) == 4:
        if not (same_dims(shape[1:], (1, t, d)) and ((isinstance(shape[0], int) and shape[0] == 1)
                                                    or same_dims(shape[0], b))):
            return None
        base = n.args[0] if is_call(n, {torch.unsqueeze}, ("unsqueeze",)) and node_arg(n, 1, "dim") == 1 else None
        sb = shape_dtype(base)
        return (base, "") if sb is not None and len(sb[0]) == 3 else (n, "squeeze1")
    if len(shape) == 3 and same_dims(shape, (1, t, d)):
        return n, ""
    if len(shape) == 2 and same_dims(shape, (t, d)):
        return n, "unsqueeze0"
    return None


def _first_use(nodes, order: dict) -> int:
    """The graph position of the first reader of any of `nodes`."""
    return min((order[u] for n in nodes for u in n.users), default=len(order))


def _aliases(node: fx.Node) -> set:
    """node and every view of it the graph takes (slices, byte views, transposes...)."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo.extend(u for u in n.users if u.target is operator.getitem or
                    (u.op == "call_method" and u.target in _VIEW_METHODS | {"view"}))
    return out


def _writes_to(u: fx.Node) -> bool:
    """Whether u changes its first argument in place (`x.add_(.)`, `x[i] = .`, `x += .`)."""
    return is_inplace(u) or (u.op == "call_function" and u.target is operator.setitem) or \
        (u.op == "call_function" and getattr(u.target, "__name__", "").endswith("_"))


class RopePass(FusionPass):
    """q, k rotation (+ the static-cache write of k and v) -> one planlang op.

    1. Where cos and sin are rows of [max_seq, D] tables read at the cache write positions
       (gpt-fast, the built-in models): `attention.RopeKVCachePass`'s site and rewrite,
       planlang::rope_kvcache, unchanged.
    2. Otherwise, where cos and sin are per-token tensors computed in the graph ([1 or B,
       T, D], unsqueezed over the heads: Hugging Face's rotary embedding of the position
       ids), the rotation reads them as they are, so the rotary positions and the write
       positions need not be one tensor:
       - a module with two static-cache writes `cache.index_copy_(2, pos, x)` (Hugging
         Face's StaticCache layers), the key write's value the rotation of k and the value
         write's v, and one query rotation with the same cos/sin: planlang::rope_kvcache_tokens
         (rotation and both writes, at `pos`). The caches must be unquantized, the rotations
         keep q's / k's dtype, and nothing between the fused op and the writes it replaces
         may touch the caches;
       - a module with no static-cache write (no cache, or one that concatenates) and
         exactly two rotations sharing one cos/sin, q and k projections viewed [B, T, H, D]
         and transposed: planlang::rope_tokens, the graph's own cache code left as it is.
    Partial rotary (rotating a slice of the head) and interleaved rotary (GPT-J pairs) do
    not match `x*cos + rotate_half(x)*sin` of a whole projection and stay unfused, with the
    reason in `explain`.
    """

    kind = "rope_kvcache"

    def __init__(self) -> None:
        from .attention import RopeKVCachePass
        self.table = RopeKVCachePass()

    def find(self, view: GraphView) -> list[Site]:
        return [s for _, s in self._candidates(view) if isinstance(s, Site)]

    def explain(self, view: GraphView) -> dict[str, str]:
        """Module path -> why the rotation / cache write there is no site."""
        return {p: s for p, s in self._candidates(view) if isinstance(s, str)}

    def _candidates(self, view: GraphView):
        from .attention import _cache_writes, _rope
        by_module: dict[str, list[dict]] = {}
        for w in _cache_writes(view):
            by_module.setdefault(node_module(w["node"]) or "", []).append(w)
        ropes = [(n, r) for n in view.graph.nodes if (r := _rope(n)) is not None]
        for path, ws in by_module.items():
            place, found = self.table._site(view, path, ws, ropes)
            if isinstance(found, str) and not any(w["quant"] for w in ws if "quant" in w):
                place, found = self._cached(view, path, ws, ropes, found)
            yield place, found
        written = set(by_module)
        by_path: dict[str, list] = {}
        for n, r in ropes:
            path = node_module(n) or ""
            if not any(w == path or w.startswith(path + ".") or path.startswith(w + ".") for w in written):
                by_path.setdefault(path, []).append((n, r))
        for path, rs in by_path.items():
            yield path, self._uncached(view, path, rs)

    @staticmethod
    def _rotation(view: GraphView, n: fx.Node, r: dict) -> Union[dict, str]:
        """The rotation n = x*cos + rotate_half(x)*sin with per-token cos/sin, as the op reads it."""
        from .attention import _bthd
        c, s = _per_token(r["cos"], r["x"]), _per_token(r["sin"], r["x"])
        if c is None or s is None:
            return ("cos/sin are neither rows of a [max_seq, D] table read at the cache write positions "
                    "nor per-token tensors [1 or B, T, D] broadcast over the heads")
        x = _bthd(r["x"])
        if x is None:
            return ("the rotated tensor is not a whole [B, T, H, D] projection transposed to [B, H, T, D] "
                    "(partial rotary, or another layout)")
        sn, sx, sc, ss = shape_dtype(n), shape_dtype(r["x"]), shape_dtype(c[0]), shape_dtype(s[0])
        if sn is None or sx is None or sc is None or ss is None or sn[1] != sx[1] or sc[1] != ss[1] \
                or not same_dims(sc[0], ss[0]) or c[1] != s[1]:
            return "the rotation changes the dtype of q/k (cos/sin of another dtype), or cos and sin differ in shape"
        return {"node": n, "x": x, "cos": c, "sin": s}

    def _cached(self, view, path, ws, ropes, table_why: str) -> tuple[str, Union[Site, str]]:
        """A per-token site with the two static-cache writes of module `path`."""
        from .attention import _FP8_FORMATS, _bthd, _common_module, _rope, _strip
        if len(ws) != 2:
            return path, table_why
        if any(view.input_tensor(w["cache"]).dtype in _FP8_FORMATS for w in ws):
            return path, table_why
        krope = [(n, r, w) for w in ws if (r := _rope(n := _strip(w["value"]))) is not None]
        if len(krope) != 1:
            return path, table_why
        (k_rot, rk, kw), = krope
        vw = next(w for w in ws if w is not kw)
        place = _common_module(path, node_module(k_rot))
        if vw["pos"] is not kw["pos"] or kw["cache"] is vw["cache"]:
            return place, table_why
        rot = self._rotation(view, k_rot, rk)
        if isinstance(rot, str):
            return place, rot
        v_in = _bthd(_strip(vw["value"]))
        if v_in is None:
            return place, "v is not a [B, T, H, D] projection transposed to [B, H, T, D]"
        qs = [q for n, r in ropes if n is not k_rot and _common_module(node_module(n), place) == place
              and not isinstance(q := self._rotation(view, n, r), str)
              and (q["cos"], q["sin"]) == (rot["cos"], rot["sin"])]
        if len(qs) != 1:
            return place, f"expected one query rotation with the key's cos/sin, found {len(qs)}"
        return place, Site(self.kind, place, (place,),
                           {"q": qs[0], "k": rot, "v": v_in, "pos": kw["pos"], "k_cache": kw["cache"],
                            "v_cache": vw["cache"], "k_write": kw["node"], "v_write": vw["node"]},
                           {"cos_sin": "per_token", "cache": "static"})

    def _uncached(self, view, path, rs) -> Union[Site, str]:
        """A rope-only site: the two rotations of module `path` that share one cos/sin."""
        rots = [self._rotation(view, n, r) for n, r in rs]
        good = [r for r in rots if not isinstance(r, str)]
        if not good:
            return next(r for r in rots)
        groups: dict[tuple, list] = {}
        for r in good:
            groups.setdefault((r["cos"], r["sin"]), []).append(r)
        pairs = [g for g in groups.values() if len(g) == 2]
        if len(pairs) != 1 or len(groups) != 1:
            return (f"expected a query and a key rotation sharing one cos/sin, found {len(good)} "
                    f"rotation(s) over {len(groups)} cos/sin pair(s)")
        q, k = pairs[0]
        sq, sk = shape_dtype(q["x"])[0], shape_dtype(k["x"])[0]
        if not (same_dims(sq[0], sk[0]) and same_dims(sq[1], sk[1]) and same_dims(sq[3], sk[3])):
            return "the two rotations are not of one batch, length and head size"
        return Site(self.kind, path, (path,), {"q": q, "k": k}, {"cos_sin": "per_token", "cache": "none"})

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        if site.info.get("cos_sin") != "per_token":
            return self.table.rewrite(view, site, weights)
        from .attention import _ancestors_until
        g, n = view.graph, site.nodes
        q, k = n["q"], n["k"]
        cached = site.info["cache"] == "static"
        order = {node: i for i, node in enumerate(g.nodes)}
        inputs = [q["x"], k["x"], q["cos"][0], q["sin"][0]]
        if cached:
            inputs += [n["v"], n["k_cache"], n["v_cache"], n["pos"]]
        last = max(inputs, key=order.__getitem__)
        if _first_use([q["node"], k["node"]], order) <= order[last]:
            return "skipped: a rotation is used before the fused op's inputs exist"
        # The op reads its inputs (and, cached, writes the caches) at one point: nothing from
        # the first input to the last node it replaces may change an input in place, nor
        # read the caches after that point.
        writes = {n["k_write"], n["v_write"]} if cached else set()
        first = min(order[x] for x in inputs)
        end = max(order[x] for x in [q["node"], k["node"], *writes])
        if any(first < order[u] <= end and u not in writes and _writes_to(u) and u.args[0] is a
               for x in inputs for a in _aliases(x) for u in a.users):
            return "skipped: an input of the fused op changes in place before the nodes it replaces ran"
        if cached:
            caches = _aliases(n["k_cache"]) | _aliases(n["v_cache"])
            if any(order[last] < order[u] < end and u not in writes and u not in caches
                   for c in caches for u in c.users):
                return "skipped: the caches are read between the fused op and the writes it replaces"
        with g.inserting_before(last.next):  # (inserting_after would reverse the nodes)
            cs = []
            for c, how in (q["cos"], q["sin"]):
                cs.append(g.call_method("squeeze", (c, 1)) if how == "squeeze1"
                          else g.call_method("unsqueeze", (c, 0)) if how == "unsqueeze0" else c)
            if cached:
                fused = g.call_function(torch.ops.planlang.rope_kvcache_tokens.default,
                                        (q["x"], k["x"], n["v"], *cs, n["k_cache"], n["v_cache"], n["pos"]))
            else:
                fused = g.call_function(torch.ops.planlang.rope_tokens.default, (q["x"], k["x"], *cs))
            outs = []
            for i in (0, 1):
                rot = g.call_function(operator.getitem, (fused, i))
                outs.append((rot, g.call_method("transpose", (rot, 1, 2))))
        for c in cs:
            if c not in (q["cos"][0], q["sin"][0]):
                adopt(c, q["node"], value=False)
        adopt(fused, k["node"], value=False)
        for old, (rot, new) in zip((q["node"], k["node"]), outs):
            adopt(rot, old, value=False)
            adopt(new, old)
        if cached:  # the writes are the fused op's now; their results (the caches) stay
            for w in (n["k_write"], n["v_write"]):
                w.replace_all_uses_with(w.args[0])
            erase_unused(g, [n["k_write"], n["v_write"]])
        for old, (_, new) in zip((q["node"], k["node"]), outs):
            old.replace_all_uses_with(new)
        for old in (k["node"], q["node"]):
            erase_unused(g, _ancestors_until(old, set(inputs)))
        erase_unused(g, [x for pair in outs for x in pair])  # a rotation nothing reads (k, written only)
        return "rope_kvcache_tokens" if cached else "rope_tokens"


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
    from .attention import AttentionPass
    return {p.kind: p for p in (RMSNormResidualPass(), SwiGLUPass(), QKVPass(), RopePass(), AttentionPass())}


PASSES: dict[str, FusionPass] = {}
