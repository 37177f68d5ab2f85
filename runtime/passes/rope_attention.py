"""Merge each `rope_kvcache` into the `attention` that reads it (`kernels/rope_attention.py`).

Runs after the fusion passes, on the ops they wrote: a `planlang::rope_kvcache` whose
rotated queries (output 0) reach exactly one `planlang::attention` as its q, through
nothing but pairs of `transpose(1, 2)` (the layout changes the two passes leave), whose
rotated keys (output 1) nobody reads, and which writes the same caches at the same
positions that attention reads, becomes one `planlang::rope_attention` where the attention
stood. Nothing between the two may touch the caches. Anything else is left as it was.

At run time the merged op is one kernel only at decode (one new token); prefill runs the
two kernels it replaced.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph import adopt, erase_unused, node_arg, node_module


def _through_transposes(n: Any) -> tuple[Any, list]:
    """(source, transposes): follow `transpose(1, 2)` pairs up from n; an odd count is no match."""
    seen = []
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target == "transpose" \
            and tuple(n.args[1:]) in ((1, 2), (2, 1)) and len(n.users) == 1:
        seen.append(n)
        n = n.args[0]
    return (n, seen) if len(seen) % 2 == 0 else (None, seen)


_LAYOUT = ("transpose", "view", "reshape", "contiguous", "permute")


def _live_users(n: fx.Node) -> list:
    """n's users but the layout changes nothing reads (left for dead-code removal)."""
    return [u for u in n.users if u.users or not (u.op == "call_method" and u.target in _LAYOUT)]


def _getitem(n: Any, rope: fx.Node, index: int) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem \
        and n.args[0] is rope and n.args[1] == index


def _match(att: fx.Node) -> Optional[tuple]:
    q, transposes = _through_transposes(att.args[0])
    if not isinstance(q, fx.Node) or q.op != "call_function" or q.target is not operator.getitem:
        return None
    rope = q.args[0]
    if not isinstance(rope, fx.Node) or rope.target is not torch.ops.planlang.rope_kvcache.default \
            or q.args[1] != 0 or len(_live_users(q)) != 1:
        return None
    if any(not _getitem(u, rope, 0) and not (_getitem(u, rope, 1) and not _live_users(u)) for u in rope.users):
        return None  # k_rot is read, or the op's result is used whole
    kc, vc, pos = rope.args[5], rope.args[6], rope.args[7]
    if att.args[1] is not kc or att.args[2] is not vc or att.args[3] is not pos:
        return None
    between, n = [], rope.next
    while n is not att and n.op != "root":
        between.append(n)
        n = n.next
    if n is not att:
        return None  # the attention comes first: not this rope's reader
    if any(x in n.all_input_nodes for n in between for x in (kc, vc) if n not in transposes):
        return None  # something between reads or writes the caches
    return rope, q, transposes


def fuse_rope_attention(graph: fx.Graph) -> list[str]:
    """Rewrite every matching rope_kvcache + attention pair into `planlang::rope_attention`;
    returns the module paths of the attention ops merged (for the report)."""
    from ..kernels import rope_attention  # noqa: F401  (registers planlang::rope_attention)
    if not hasattr(torch.ops.planlang, "rope_kvcache") or not hasattr(torch.ops.planlang, "attention"):
        return []
    merged = []
    for att in list(graph.nodes):
        if att.op != "call_function" or att.target is not torch.ops.planlang.attention.default:
            continue
        found = _match(att)
        if found is None:
            continue
        rope, q_rot, transposes = found
        q, k, v, cos, sin, kc, vc, pos = rope.args[:8]
        rope_ks, rope_vs = node_arg(rope, 8, "k_scale"), node_arg(rope, 9, "v_scale")
        kv_format = node_arg(rope, 10, "kv_format", "")
        scale, softcap, sinks, window, causal = att.args[4:9]
        k_scale, v_scale = node_arg(att, 9, "k_scale"), node_arg(att, 10, "v_scale")
        with graph.inserting_before(att):
            fused = graph.call_function(
                torch.ops.planlang.rope_attention.default,
                (q, k, v, cos, sin, kc, vc, pos, rope_ks, rope_vs, kv_format, scale, softcap, sinks, window,
                 causal, k_scale, v_scale))
        adopt(fused, att)
        att.replace_all_uses_with(fused)
        dead = [u for x in (q_rot, *rope.users) for u in x.users if not u.users and u is not att]
        erase_unused(graph, list(dict.fromkeys([att, *transposes, *dead, q_rot, *rope.users, rope])))
        merged.append(node_module(fused) or "")
    return merged
