"""Fold each RMSNorm into the prologue of the GEMM that reads it (`kernels/norm_gemm.py`).

Runs after the fusion and precision passes, on the ops they wrote: a
`planlang::rmsnorm_residual` (or `planlang::rmsnorm`) whose normalized output has exactly one
reader, and that reader is the input of a planlang GEMM op (`linear`, `qkv_linear`,
`swiglu_linear` or the weight-only `fp8_linear`), becomes one `planlang::rmsnorm_gemm`. The
residual sum s keeps its readers (the next layer's residual), which must all come after the
GEMM in graph order (the fused op stands where the GEMM stood). Anything else (a norm read
twice, a cast between norm and GEMM, dynamically quantized activations) is left as it was.

At run time the fused op is one kernel only where the GEMM is a one-row GEMV (decode at
batch 1); elsewhere it runs the two kernels it replaced, so the numbers at every batch size
are those of the norm and GEMM ops, up to the rounding of the normalized row (module
docstring of `kernels/norm_gemm.py`).
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx

from .graph import adopt, erase_unused, node_arg, node_module


class GemmOperands(NamedTuple):
    x: Any
    w: Any
    w_scale: Any
    bias: Any
    block_size: int
    act: Optional[str]


def gemm_operands(n: Any) -> Optional[GemmOperands]:
    """The operands of a planlang GEMM op node, or None for any other node."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    ops = torch.ops.planlang
    if n.target in (ops.linear.default, ops.qkv_linear.default):
        return GemmOperands(node_arg(n, 0, "x"), node_arg(n, 1, "w", node_arg(n, 1, "w_qkv")), None, node_arg(n, 2, "bias"), 0, None)
    if n.target is ops.swiglu_linear.default:
        return GemmOperands(node_arg(n, 0, "x"), node_arg(n, 1, "w13"), None, None, 0, node_arg(n, 2, "act", "silu"))
    if hasattr(ops, "fp8_linear") and n.target is ops.fp8_linear.default:
        return GemmOperands(node_arg(n, 0, "x"), node_arg(n, 1, "wq"), node_arg(n, 2, "w_scale"), node_arg(n, 3, "bias"),
                            node_arg(n, 4, "block_size", 0), node_arg(n, 5, "act"))
    return None


def _norm_parts(n: fx.Node) -> Optional[tuple]:
    """(x, residual, g, eps, offset, s node, h node) of a planlang norm op node, else None."""
    ops = torch.ops.planlang
    if n.op != "call_function":
        return None
    if n.target is ops.rmsnorm_residual.default:
        x, r, g, eps = n.args[:4]
        offset = node_arg(n, 4, "offset", 0.0)
        outs = {u.args[1]: u for u in n.users if u.target is operator.getitem}
        if len(outs) != len(n.users) or 1 not in outs:
            return None
        return x, r, g, eps, offset, outs.get(0), outs[1]
    if n.target is ops.rmsnorm.default:
        x, g, eps = n.args[:3]
        return x, None, g, eps, node_arg(n, 3, "offset", 0.0), None, n
    return None


def fold_norms(graph: fx.Graph) -> list[str]:
    """Rewrite every foldable norm + GEMM pair into `planlang::rmsnorm_gemm`; returns the
    module paths of the norms folded (for the report)."""
    from ..kernels import norm_gemm  # noqa: F401  (registers planlang::rmsnorm_gemm)
    order = {n: i for i, n in enumerate(graph.nodes)}
    folded = []
    for n in list(graph.nodes):
        parts = _norm_parts(n)
        if parts is None:
            continue
        x, r, g, eps, offset, s_node, h_node = parts
        if len(h_node.users) != 1:
            continue
        gemm = next(iter(h_node.users))
        ops = gemm_operands(gemm)
        if ops is None or ops.x is not h_node or h_node in (ops.w, ops.w_scale, ops.bias):
            continue
        if s_node is not None and any(order[u] < order[gemm] for u in s_node.users):
            continue  # the residual sum is read before the GEMM: it must exist there
        with graph.inserting_before(gemm):
            fused = graph.call_function(torch.ops.planlang.rmsnorm_gemm.default,
                                        (x, r, g, eps, offset, ops.w, ops.w_scale, ops.bias, ops.block_size, ops.act))
            new_s = graph.call_function(operator.getitem, (fused, 0))
            new_y = graph.call_function(operator.getitem, (fused, 1))
        adopt(fused, h_node, value=False)
        adopt(new_y, gemm)
        gemm.replace_all_uses_with(new_y)
        if s_node is not None:
            adopt(new_s, s_node)
            s_node.replace_all_uses_with(new_s)
        erase_unused(graph, [d for d in dict.fromkeys((gemm, h_node, s_node, n)) if d is not None])
        folded.append(node_module(fused) or "")
    return folded
