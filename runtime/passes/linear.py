"""The `linear` fusion kind (a planlang extension): every linear that no other fusion took
runs through `planlang::linear`, which picks per shape the fastest kernel that computes the
same numbers up to accumulation order (a Triton GEMV for one row, the tuned skinny GEMM or
cuBLAS for a few, cuBLAS for prefill). At decode this is most of the step: the output and
down projections and the LM head are GEMVs that cuBLAS streams at 1.3-2 TB/s on an H100."""
from __future__ import annotations

import torch

from .fusions import FusedWeights, FusionPass, Site
from .graph import LINEAR_TARGETS, GraphView, is_call, node_module


class LinearPass(FusionPass):
    kind = "linear"

    def find(self, view: GraphView) -> list[Site]:
        sites = []
        for n in view.graph.nodes:
            if not is_call(n, LINEAR_TARGETS):
                continue
            w = view.linear_weight(n)
            if w is None or w[1].dim() != 2:
                continue
            path = node_module(n) or w[0]  # a tied LM head is the module that calls it, not the weight's owner
            sites.append(Site(self.kind, path, (path,), {"linear": n}, {"shape": tuple(w[1].shape)}))
        return sites

    def rewrite(self, view: GraphView, site: Site, weights: FusedWeights) -> str:
        n = site.nodes["linear"]
        args = list(n.args) + [None] * (3 - len(n.args))
        x, w, b = args[0], n.kwargs.get("weight", args[1]), n.kwargs.get("bias", args[2])
        weight = view.linear_weight(n)[1]
        spec, _ = weights.gemm_precision([site.path], weight.dtype)
        kernel = "linear"
        if spec is not None:
            from .precision import emit_gemm, record
            key = ("linear", site.path)
            new = emit_gemm(view, n, x, weight, b, key, spec, weights,
                            lambda xc, wn, bc: view.graph.call_function(torch.ops.planlang.linear.default, (xc, wn, bc)))
            kernel = weights.prepared(key, weight, spec).kernel
            record(weights, [site.path], spec, kernel, weights.last_by_rows)
        else:
            with view.graph.inserting_before(n):
                new = view.graph.call_function(torch.ops.planlang.linear.default, (x, w, b))
        new.meta["nn_module_stack"] = n.meta.get("nn_module_stack")
        n.replace_all_uses_with(new)
        view.graph.erase_node(n)
        return kernel
