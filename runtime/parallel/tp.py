"""Tensor parallelism (PLAN_SPEC.md §8a) on torch.distributed: each rank keeps its shard of
the weights as plain local tensors, and torch.distributed's functional collectives
(`torch.distributed._functional_collectives`) join the shards where the math needs it.

Why local shards and functional collectives, not DTensor's `parallelize_module`: the
fusion passes rewrite graphs into `planlang::` custom ops that take plain tensors, and the
fused weights ([Wq; Wk; Wv], [W1; W3]) are concatenations of each rank's parameters. With
local shards the model each rank holds is an ordinary model with fewer heads and a narrower
FFN: the passes find the same sites (one QKV site per layer, with per-rank sizes), build
fused weights from the shard, and quantize each shard on its own. The collectives are
`_c10d_functional` ops, which Dynamo traces into the graph and CUDA graphs capture (NCCL).
The styles mean what DTensor's `ColwiseParallel` / `RowwiseParallel` mean.

What a style does to a module (`shard_model`):
- linear, `colwise`: its weight's rows (output features) are split; inside an attention
  block whose q, k, v are colwise and whose output projection is rowwise, the split is by
  head and the outputs stay local (the block computes its own heads only); elsewhere (and
  likewise for the gate/up pair of an MLP whose down projection is rowwise) the output is
  all-gathered, so the module still returns what it returned before.
- linear, `rowwise`: its weight's columns (input features) are split and its output is
  all-reduced (sum); its bias is added once, after the reduction. When its input is not
  already split (no colwise partner before it) the input is sliced first.
- embedding, `rowwise`: vocabulary-parallel: rows of the table; ids outside the rank's
  range read zeros; the lookups are all-reduced. `colwise` splits the embedding width and
  all-gathers it.
- LM head, `colwise`: vocabulary-parallel: rows of the weight; logits are all-gathered
  along the vocabulary. A head tied to a vocabulary-parallel embedding stays tied (both
  hold the same rows).
- `replicate`: nothing changes.

Left out by the plan, the styles follow from the model's structure: the q/k/v projections
and the gate/up pair colwise, the attention output and the down projection rowwise, the
input embedding rowwise (vocabulary-parallel) and the LM head colwise (vocabulary-
parallel). Structure means the Llama-family layouts: the built-in models
(`layers.N.attn.{wq,wk,wv,wo}`, `layers.N.mlp.{w1,w3,w2}`) and Hugging Face's
(`model.layers.N.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), each checked
against the shapes (head size, head counts, FFN width). The plan's `styles` override these
where they select (the last rule wins, op suffixes `:linear`, `:lm_head`, `:embedding`).

KV heads: split when the degree divides them; when the degree is a multiple of them, each
rank keeps the one KV head its query heads read (replicated over degree / KV heads ranks);
otherwise the plan is refused (PL307). The attention module's head counts are set to the
rank's (`n_heads`, `n_kv_heads`, `num_key_value_groups`, ...), and the static KV cache is
allocated again for the rank's heads only.

`sequence: true` (Megatron's sequence parallelism): from the first decoder block's input
to the last one's output the residual stream holds only this rank's slice of the tokens; each
attention and MLP block all-gathers its input along the sequence and reduce-scatters its
output instead of all-reducing it, so norms and residual adds run on 1/N of the tokens. A
call whose token count the degree does not divide (decode: one token) runs as without it.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# (q, k, v, o) and (gate, up, down) attribute names of the Llama-family layouts.
ATTENTION_LAYOUTS = (("wq", "wk", "wv", "wo"), ("q_proj", "k_proj", "v_proj", "o_proj"))
MLP_LAYOUTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
_Q_ATTRS = ("n_heads", "num_heads", "num_attention_heads")
_KV_ATTRS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
_GROUP_ATTRS = ("num_key_value_groups", "n_rep")


@dataclass
class ShardInfo:
    """How this rank holds the model: its place in the group, the style each module got,
    and what each split module keeps."""

    rank: int
    world: int
    group: str                                     # process group name (functional collectives take it)
    backend: str
    sequence: bool = False
    styles: dict[str, str] = field(default_factory=dict)      # module path -> style applied
    source: dict[str, Optional[int]] = field(default_factory=dict)  # module path -> plan rule index (None: inferred)
    places: dict[str, str] = field(default_factory=dict)      # module path -> what this rank keeps
    attention: dict[str, dict] = field(default_factory=dict)  # attention path -> heads kept
    collectives: list[tuple[str, str]] = field(default_factory=list)  # (kind, module path) per forward
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


class ParallelError(Exception):
    """Raised by the helpers below; `shard_model` turns it into an ApplyError."""

    def __init__(self, path: tuple, code: str, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.path, self.code, self.message, self.hint = path, code, message, hint


# ----------------------------------------------------------------------------- structure

@dataclass
class _Attention:
    path: str
    module: nn.Module
    names: tuple[str, str, str, str]
    head_dim: int
    n_heads: int
    n_kv_heads: int

    def leaves(self) -> list[str]:
        return [f"{self.path}.{n}" if self.path else n for n in self.names]


@dataclass
class _MLP:
    path: str
    module: nn.Module
    names: tuple[str, str, str]
    ffn: int

    def leaves(self) -> list[str]:
        return [f"{self.path}.{n}" if self.path else n for n in self.names]


def _cfg(model: nn.Module, *keys: str) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for k in keys:
        v = cfg.get(k) if isinstance(cfg, dict) else getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def find_attention(model: nn.Module) -> list[_Attention]:
    """Attention blocks of the Llama-family layouts, checked against their shapes."""
    out = []
    for path, m in model.named_modules():
        for names in ATTENTION_LAYOUTS:
            mods = [getattr(m, n, None) for n in names]
            if not all(isinstance(x, nn.Linear) for x in mods):
                continue
            q, k, v, o = mods
            head_dim = getattr(m, "head_dim", None)
            if not isinstance(head_dim, int):
                heads = _cfg(model, "n_heads", "num_attention_heads")
                head_dim = q.out_features // heads if heads and q.out_features % heads == 0 else None
            if not head_dim or q.out_features % head_dim or k.out_features % head_dim:
                continue
            if k.out_features != v.out_features or o.in_features != q.out_features or \
                    len({q.in_features, k.in_features, v.in_features}) != 1:
                continue
            n_heads, n_kv = q.out_features // head_dim, k.out_features // head_dim
            if n_heads % n_kv:
                continue
            out.append(_Attention(path, m, names, head_dim, n_heads, n_kv))
            break
    return out


def find_mlps(model: nn.Module) -> list[_MLP]:
    """Gated MLPs (gate, up, down) of the Llama-family layouts, checked against their shapes."""
    out = []
    for path, m in model.named_modules():
        for names in MLP_LAYOUTS:
            mods = [getattr(m, n, None) for n in names]
            if not all(isinstance(x, nn.Linear) for x in mods):
                continue
            gate, up, down = mods
            if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features:
                continue
            out.append(_MLP(path, m, names, gate.out_features))
            break
    return out


def lm_heads(model: nn.Module) -> set[str]:
    from ..passes.precision import lm_head_paths
    return lm_head_paths(model)


def input_embeddings(model: nn.Module) -> set[str]:
    """The token embedding(s): `get_input_embeddings()` where the model has it, else every
    nn.Embedding whose table is as long as the vocabulary."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    vocab = _cfg(model, "vocab_size")
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and (m is emb or (vocab is not None and m.num_embeddings == vocab))}


def op_kind(path: str, module: nn.Module, heads: set[str]) -> Optional[str]:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "lm_head" if path in heads else "linear"
    return None


def infer_styles(model: nn.Module) -> dict[str, str]:
    """Module path -> style, from the model's structure (see the module docstring)."""
    styles: dict[str, str] = {}
    for a in find_attention(model):
        for leaf, style in zip(a.leaves(), ("colwise", "colwise", "colwise", "rowwise")):
            styles[leaf] = style
    for m in find_mlps(model):
        for leaf, style in zip(m.leaves(), ("colwise", "colwise", "rowwise")):
            styles[leaf] = style
    for e in input_embeddings(model):
        styles[e] = "rowwise"
    for h in lm_heads(model):
        styles[h] = "colwise"
    return styles


def resolve_styles(model: nn.Module, plan) -> tuple[dict[str, str], dict[str, Optional[int]], list[int]]:
    """(style, rule) for every linear and embedding: the last plan rule that selects it,
    else the inferred style, else replicate. Also the rules that select no linear or
    embedding at all."""
    from planlang.selectors import Selector, resolve
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    heads = lm_heads(model)
    leaves = {n: op_kind(n, m, heads) for n, m in mods.items()}
    leaves = {n: k for n, k in leaves.items() if k is not None}
    inferred = infer_styles(model)
    styles = {n: inferred.get(n, "replicate") for n in leaves}
    source: dict[str, Optional[int]] = {n: None for n in leaves}
    empty = []
    for i, rule in enumerate(plan.parallel.styles):
        sel = Selector.parse(rule.at)
        named = set(resolve(sel, names))
        took = False
        for leaf, op in leaves.items():
            if sel.op is not None and sel.op != op:
                continue
            parts = leaf.split(".")
            if any(".".join(parts[:j]) in named for j in range(0, len(parts) + 1)):
                styles[leaf], source[leaf] = rule.style, i
                took = True
        if not took:
            empty.append(i)
    return styles, source, empty


# ----------------------------------------------------------------------------- collectives

def _funcol():
    import torch.distributed._functional_collectives as funcol
    return funcol


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _funcol().all_reduce(x, "sum", group)


def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    # A non-negative dim: torch's view shortcut for the gathered layout mishandles -1.
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the name before torch 2.12
    return gather(x.contiguous(), dim % x.dim(), group)


def reduce_scatter(x: torch.Tensor, dim: int, group: str, world: int) -> torch.Tensor:
    """Sum over ranks, each rank keeping its slice along `dim`."""
    # The slices are stacked along dim 0 here rather than by funcol: funcol's own
    # rearrangement rebinds a variable named `self`, which Dynamo turns into a graph node of
    # that name, and the graph's generated forward then loses its own `self` (the get_attr
    # of a fused weight fails).
    dim = dim % x.dim()
    if dim != 0:
        x = torch.cat(torch.chunk(x, world, dim=dim), dim=0)
    funcol = _funcol()
    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    return scatter(x.contiguous(), "sum", 0, group)


class _SequenceState:
    """Whether the forward in flight splits the sequence: set by the first decoder block's
    pre-hook from the token count, read by the hooks after it."""

    def __init__(self, world: int):
        self.world = world
        self.active = False


def _seq_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() >= 3 else 0


# ----------------------------------------------------------------------------- sharding helpers

class _Slicer:
    """Makes the local shard of a parameter once per (parameter, dim, range), so weights
    shared between modules (a tied LM head) stay shared when both take the same rows."""

    def __init__(self):
        self.memo: dict[tuple, nn.Parameter] = {}

    def take(self, p: nn.Parameter, dim: int, lo: int, hi: int) -> nn.Parameter:
        key = (id(p), dim, lo, hi)
        if key not in self.memo:
            local = p.detach().narrow(dim, lo, hi - lo).clone().contiguous()
            self.memo[key] = nn.Parameter(local, requires_grad=p.requires_grad)
        return self.memo[key]


def _shard_linear_rows(slicer: _Slicer, lin: nn.Linear, lo: int, hi: int) -> None:
    lin.weight = slicer.take(lin.weight, 0, lo, hi)
    if lin.bias is not None:
        lin.bias = slicer.take(lin.bias, 0, lo, hi)
    lin.out_features = hi - lo


def _shard_linear_cols(slicer: _Slicer, lin: nn.Linear, lo: int, hi: int, group: str, state) -> None:
    """Rowwise: keep input features lo..hi; all-reduce the output (or reduce-scatter it
    along the sequence); the bias is added once, after."""
    lin.weight = slicer.take(lin.weight, 1, lo, hi)
    lin.in_features = hi - lo
    bias = lin.bias
    if bias is not None:
        lin.bias = None
        lin.register_parameter("tp_bias", bias)

    def reduce(module, args, out):
        if state is not None and state.active:
            out = reduce_scatter(out, _seq_dim(out), group, state.world)
        else:
            out = all_reduce(out, group)
        b = getattr(module, "tp_bias", None)
        return out + b if b is not None else out
    lin.register_forward_hook(reduce)


def _gather_output(module: nn.Module, group: str) -> None:
    module.register_forward_hook(lambda m, args, out: all_gather(out, -1, group))


def _slice_input(module: nn.Module, lo: int, hi: int) -> None:
    def take(m, args):
        return (args[0][..., lo:hi],) + tuple(args[1:])
    module.register_forward_pre_hook(take)


def _vocab_parallel_embedding(emb: nn.Embedding, lo: int, hi: int, group: str) -> None:
    """Rows lo..hi of the table; ids outside read zeros; the lookups are summed over ranks.
    The module's own forward (a scaled embedding, say) still runs, on the local ids."""
    inner = emb.forward

    def forward(self, ids, *args, **kwargs):
        inside = (ids >= lo) & (ids < hi)
        local = torch.where(inside, ids - lo, torch.zeros_like(ids))
        out = inner(local, *args, **kwargs)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, group)
    emb.forward = types.MethodType(forward, emb)
    emb.num_embeddings = hi - lo
    if emb.padding_idx is not None:
        emb.padding_idx = emb.padding_idx - lo if lo <= emb.padding_idx < hi else None


def _set_heads(module: nn.Module, n_heads: int, n_kv: int, local_q: int, local_kv: int, head_dim: int) -> list[str]:
    """Set the attention module's head counts to the rank's; returns the attributes set."""
    done = []
    for attr in _Q_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == n_heads:
            setattr(module, attr, local_q)
            done.append(attr)
    for attr in _KV_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == n_kv:
            setattr(module, attr, local_kv)
            done.append(attr)
    for attr in _GROUP_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == n_heads // n_kv:
            setattr(module, attr, local_q // local_kv)
            done.append(attr)
    # Older Hugging Face attention reshapes its output to `hidden_size` (= heads x head_dim).
    if isinstance(getattr(module, "hidden_size", None), int) and module.hidden_size == n_heads * head_dim:
        module.hidden_size = local_q * head_dim
        done.append("hidden_size")
    return done


def _head_params(module: nn.Module, n_heads: int) -> list[str]:
    """The attention module's own per-head parameters (gpt-oss attention sinks)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 1 and p.shape[0] == n_heads]


# ----------------------------------------------------------------------------- the entry point

def _error(source, path, code, message, hint=None):
    from planlang.diagnostics import at
    from ..apply import ApplyError
    return ApplyError([at(source, path, code, message, hint=hint)])


def _divisors_hint(n: int) -> str:
    ok = [d for d in range(2, min(n, 64) + 1) if n % d == 0][:6]
    return (f"use a degree that divides {n} ({', '.join(map(str, ok))})" if ok
            else f"{n} has no divisor above 1: leave this module replicated")


def _place(source: dict, leaf: str) -> tuple:
    i = source.get(leaf)
    return ("parallel", "styles", i, "at") if i is not None else ("parallel", "tensor")


def shard_model(model: nn.Module, plan, report=None, source=None, *, group=None) -> Optional[ShardInfo]:
    """Split `model` in place for `plan.parallel` over the default process group (or
    `group`): each rank keeps its shard as local tensors, collectives are installed as
    hooks, head counts and KV caches become the rank's. Returns None at `tensor: 1`.

    Call it after the plan's selectors resolve and before the model is traced, so the
    fusion passes see the rank's shard. Raises `planlang.runtime.apply.ApplyError` (with
    the place in the plan and a hint) when no process group is set up, when its size is
    not the plan's degree, or when the degree does not divide what it must split.
    """
    import torch.distributed as dist
    par = plan.parallel
    tensor = par.tensor
    done = getattr(model, "_planlang_tp", None)
    if done is not None and (group is None or group.group_name == done.group):
        # Split before (an earlier plan of `planlang bench`, or a caller that passed its
        # own group, apply() calling again without one): the same degree takes it as is.
        if done.world == tensor and done.sequence == par.sequence:
            if done.world == 1:
                return None
            _report(report, plan, done)
            return done
        raise _error(source, ("parallel", "tensor"), "PL307",
                     f"the model is already split for tensor: {done.world}"
                     + (" with sequence parallelism" if done.sequence else "")
                     + f"; it cannot be split again for tensor: {tensor}" + (", sequence" if par.sequence else ""),
                     hint="load the model again for another degree")
    if tensor > 1 and plan.mode == "training":
        # The functional collectives' backward is not tensor parallelism's (an all-reduce
        # of the input gradient of colwise layers, identity after rowwise ones).
        raise _error(source, ("parallel", "tensor"), "PL307",
                     f"tensor: {tensor} runs inference only: training a split model is not supported yet",
                     hint="use tensor: 1 with mode: training")
    initialized = dist.is_available() and dist.is_initialized()
    if group is None and initialized:
        group = dist.group.WORLD
    world = dist.get_world_size(group) if group is not None else 1
    if tensor == 1 and world == 1:
        if group is not None:  # a one-rank group named by the caller: remember it for apply's own call
            model._planlang_tp = ShardInfo(0, 1, group.group_name, str(dist.get_backend(group)), par.sequence)
        return None
    if group is None:
        raise _error(source, ("parallel", "tensor"), "PL307",
                     f"tensor: {tensor} needs {tensor} processes in a torch.distributed job; this run is one process "
                     "with no process group",
                     hint=f"start it with `planlang apply|bench ... --nproc {tensor}`, or under `torchrun "
                          f"--nproc-per-node {tensor}`")
    if world != tensor:
        raise _error(source, ("parallel", "tensor"), "PL307",
                     f"tensor: {tensor} does not match the {world} process(es) of this torch.distributed job",
                     hint=f"start {tensor} processes (--nproc {tensor}), or set tensor: {world}")
    rank = dist.get_rank(group)
    name = group.group_name
    backend = str(dist.get_backend(group))

    styles, src, empty = resolve_styles(model, plan)
    for i in empty:
        rule = par.styles[i]
        if rule.style != "replicate":
            raise _error(source, ("parallel", "styles", i, "at"), "PL309",
                         f"'{rule.at}' (parallel style {rule.style}) selects no linear or embedding of this model",
                         hint="styles split linears (colwise, rowwise), embeddings and the LM head")
    try:
        info = _shard(model, plan, styles, src, rank, world, name, backend)
    except ParallelError as exc:
        raise _error(source, exc.path, exc.code, exc.message, exc.hint) from None
    info.notes += [f"parallel style {par.styles[i].style} at '{par.styles[i].at}' selects no linear or embedding"
                   for i in empty]
    model._planlang_tp = info
    _report(report, plan, info)
    return info


def _check(ok: bool, path: tuple, message: str, hint: str) -> None:
    if not ok:
        raise ParallelError(path, "PL307", message, hint)


def _shard(model: nn.Module, plan, styles: dict, src: dict, rank: int, world: int, group: str,
           backend: str) -> ShardInfo:
    """Check everything first (so a refused plan leaves the model untouched), then split."""
    mods = dict(model.named_modules())
    info = ShardInfo(rank, world, group, backend, plan.parallel.sequence)
    state = _SequenceState(world) if plan.parallel.sequence else None
    attention = find_attention(model)
    mlps = find_mlps(model)
    actions: list = []          # closures, run once every check passed
    grouped: set[str] = set()

    # Attention blocks split by head.
    for a in attention:
        q, k, v, o = a.leaves()
        if not (styles[q] == styles[k] == styles[v] == "colwise" and styles[o] == "rowwise"):
            continue
        where = _place(src, q)
        _check(a.n_heads % world == 0, where,
               f"tensor: {world} does not divide the query heads ({a.n_heads}) of {a.path}",
               _divisors_hint(a.n_heads))
        local_q = a.n_heads // world
        if a.n_kv_heads % world == 0:
            local_kv, kv_lo, replicated = a.n_kv_heads // world, rank * (a.n_kv_heads // world), False
        else:
            _check(world % a.n_kv_heads == 0, where,
                   f"tensor: {world} does not divide the KV heads ({a.n_kv_heads}) of {a.path}, and they cannot "
                   f"be replicated ({world} is not a multiple of {a.n_kv_heads})",
                   f"use a degree that divides {a.n_kv_heads}, or a multiple of it that divides {a.n_heads}")
            local_kv, kv_lo, replicated = 1, rank // (world // a.n_kv_heads), True
        hd = a.head_dim
        q_lo, q_hi = rank * local_q * hd, (rank + 1) * local_q * hd
        kv_range = (kv_lo * hd, (kv_lo + local_kv) * hd)
        grouped.update(a.leaves())
        info.attention[a.path] = {"q_heads": [rank * local_q, (rank + 1) * local_q],
                                  "kv_heads": [kv_lo, kv_lo + local_kv], "of": [a.n_heads, a.n_kv_heads],
                                  "kv_replicated": replicated}
        info.places[q] = f"query heads {rank * local_q}..{(rank + 1) * local_q - 1} of {a.n_heads}"
        for leaf in (k, v):
            info.places[leaf] = (f"KV head {kv_lo} of {a.n_kv_heads} (replicated)" if replicated else
                                 f"KV heads {kv_lo}..{kv_lo + local_kv - 1} of {a.n_kv_heads}")
        info.places[o] = f"input features {q_lo}..{q_hi - 1} of {a.n_heads * hd}, output all-reduced"
        info.collectives.append(("all_reduce", o))

        def split_attention(a=a, local_q=local_q, local_kv=local_kv, q_lo=q_lo, q_hi=q_hi, kv_range=kv_range):
            qm, km, vm, om = (mods[x] for x in a.leaves())
            _shard_linear_rows(slicer, qm, q_lo, q_hi)
            _shard_linear_rows(slicer, km, *kv_range)
            _shard_linear_rows(slicer, vm, *kv_range)
            _shard_linear_cols(slicer, om, q_lo, q_hi, group, state)
            for pname in _head_params(a.module, a.n_heads):
                head_lo, head_hi = q_lo // a.head_dim, q_hi // a.head_dim
                setattr(a.module, pname, slicer.take(getattr(a.module, pname), 0, head_lo, head_hi))
            _set_heads(a.module, a.n_heads, a.n_kv_heads, local_q, local_kv, a.head_dim)
            _shard_kv_cache(a.module, kv_range[0] // a.head_dim, local_kv, a.n_kv_heads)
        actions.append(split_attention)

    # Gated MLPs split along the FFN width.
    for m in mlps:
        g, u, d = m.leaves()
        if not (styles[g] == styles[u] == "colwise" and styles[d] == "rowwise"):
            continue
        _check(m.ffn % world == 0, _place(src, g),
               f"tensor: {world} does not divide the FFN width ({m.ffn}) of {m.path}", _divisors_hint(m.ffn))
        lo, hi = rank * m.ffn // world, (rank + 1) * m.ffn // world
        grouped.update(m.leaves())
        for leaf in (g, u):
            info.places[leaf] = f"FFN rows {lo}..{hi - 1} of {m.ffn}"
        info.places[d] = f"FFN columns {lo}..{hi - 1} of {m.ffn}, output all-reduced"
        info.collectives.append(("all_reduce", d))

        def split_mlp(m=m, lo=lo, hi=hi):
            gm, um, dm = (mods[x] for x in m.leaves())
            _shard_linear_rows(slicer, gm, lo, hi)
            _shard_linear_rows(slicer, um, lo, hi)
            _shard_linear_cols(slicer, dm, lo, hi, group, state)
        actions.append(split_mlp)

    # Everything else, one module at a time.
    for leaf, style in styles.items():
        info.styles[leaf] = style
        info.source[leaf] = src[leaf]
        if leaf in grouped or style == "replicate":
            continue
        mod = mods[leaf]
        where = _place(src, leaf)
        if isinstance(mod, nn.Embedding):
            size = mod.num_embeddings if style == "rowwise" else mod.embedding_dim
            what = "vocabulary" if style == "rowwise" else "embedding width"
            _check(size % world == 0, where, f"tensor: {world} does not divide the {what} ({size}) of {leaf}",
                   _divisors_hint(size))
            lo, hi = rank * size // world, (rank + 1) * size // world
            if style == "rowwise":
                info.places[leaf] = f"vocabulary rows {lo}..{hi - 1} of {size}, lookups all-reduced"
                info.collectives.append(("all_reduce", leaf))

                def split_embed(mod=mod, lo=lo, hi=hi):
                    mod.weight = slicer.take(mod.weight, 0, lo, hi)
                    _vocab_parallel_embedding(mod, lo, hi, group)
            else:
                info.places[leaf] = f"embedding columns {lo}..{hi - 1} of {size}, all-gathered"
                info.collectives.append(("all_gather", leaf))

                def split_embed(mod=mod, lo=lo, hi=hi):
                    mod.weight = slicer.take(mod.weight, 1, lo, hi)
                    mod.embedding_dim = hi - lo
                    _gather_output(mod, group)
            actions.append(split_embed)
            continue
        head = leaf in lm_heads(model)
        if style == "colwise":
            size = mod.out_features
            what = "vocabulary" if head else "output features"
            _check(size % world == 0, where, f"tensor: {world} does not divide the {what} ({size}) of {leaf}",
                   _divisors_hint(size))
            lo, hi = rank * size // world, (rank + 1) * size // world
            info.places[leaf] = f"{'vocabulary' if head else 'output'} rows {lo}..{hi - 1} of {size}, all-gathered"
            info.collectives.append(("all_gather", leaf))

            def split_col(mod=mod, lo=lo, hi=hi):
                _shard_linear_rows(slicer, mod, lo, hi)
                _gather_output(mod, group)
            actions.append(split_col)
        else:
            size = mod.in_features
            _check(size % world == 0, where, f"tensor: {world} does not divide the input features ({size}) of {leaf}",
                   _divisors_hint(size))
            lo, hi = rank * size // world, (rank + 1) * size // world
            info.places[leaf] = f"input features {lo}..{hi - 1} of {size} (input sliced), output all-reduced"
            info.collectives.append(("all_reduce", leaf))

            def split_row(mod=mod, lo=lo, hi=hi):
                _slice_input(mod, lo, hi)
                _shard_linear_cols(slicer, mod, lo, hi, group, None)
            actions.append(split_row)

    if plan.parallel.sequence:
        seq = _sequence_plan(model, attention, mlps, grouped, info)
        actions.append(lambda: _install_sequence(seq, state, group, rank))
    if not info.places:
        raise ParallelError(("parallel", "tensor"), "PL309",
                            f"tensor: {world} splits nothing in this model: planlang recognizes no attention block, "
                            "gated MLP, embedding or LM head in it, and no style names one of its linears",
                            "write parallel.styles naming the linears to split (colwise / rowwise)")
    slicer = _Slicer()
    for act in actions:
        act()
    _reallocate_caches(model)
    return info


def _shard_kv_cache(attn: nn.Module, kv_lo: int, local_kv: int, n_kv: int) -> None:
    """A built-in KVCache child with FP8 scales per KV head keeps the rank's scales."""
    for child in attn.children():
        if hasattr(child, "allocate") and hasattr(child, "k_scale"):
            for name in ("k_scale", "v_scale"):
                s = getattr(child, name, None)
                if isinstance(s, torch.Tensor) and s.numel() == n_kv:
                    setattr(child, name, s[kv_lo: kv_lo + local_kv].clone())


def _reallocate_caches(model: nn.Module) -> None:
    """Built-in models: allocated caches are allocated again for the rank's KV heads."""
    if hasattr(model, "setup_caches") and getattr(model, "max_batch", 0) and hasattr(model, "caches_fit") \
            and model.caches_fit(1, 1):
        model.setup_caches(model.max_batch, model.max_seq_len)


# ----------------------------------------------------------------------------- sequence parallelism

@dataclass
class _SequencePlan:
    first_block: nn.Module
    last_block: nn.Module
    blocks: list[nn.Module]      # attention and MLP modules: gather their input


def _sequence_plan(model: nn.Module, attention: list, mlps: list, grouped: set, info: ShardInfo) -> _SequencePlan:
    """Where the sequence is split and gathered: the first decoder block's input and the
    last one's output. Needs every block's attention and MLP split by heads / FFN width
    (their output projections are where the reduce-scatters go)."""
    split_a = [a for a in attention if a.leaves()[0] in grouped]
    split_m = [m for m in mlps if m.leaves()[0] in grouped]
    if not split_a or len(split_a) != len(attention) or len(split_m) != len(mlps):
        raise ParallelError(("parallel", "sequence"), "PL307",
                            "sequence: true needs every attention block split by head and every MLP by FFN width "
                            "(q/k/v and gate/up colwise, output and down projections rowwise)",
                            "drop the styles that replicate or regroup these linears, or set sequence: false")
    mods = dict(model.named_modules())
    parent = lambda p: p.rpartition(".")[0]  # noqa: E731
    block_paths = sorted({parent(a.path) for a in split_a} | {parent(m.path) for m in split_m})
    lists = {parent(p) for p in block_paths}
    if len(lists) != 1 or not isinstance(mods.get(next(iter(lists))), nn.ModuleList):
        raise ParallelError(("parallel", "sequence"), "PL307",
                            "sequence: true needs the decoder blocks in one list (layers.N)",
                            "set sequence: false for this model")
    layers_path = next(iter(lists))
    layers = mods[layers_path]
    if len(block_paths) != len(layers):
        raise ParallelError(("parallel", "sequence"), "PL307",
                            f"sequence: true needs a split attention block and MLP in every block of {layers_path}",
                            "set sequence: false for this model")
    info.notes.append("sequence parallel: the residual stream holds 1/N of the tokens from the first decoder block "
                      "to the last one's output, when the degree divides the token count")
    return _SequencePlan(layers[0], layers[len(layers) - 1], [a.module for a in split_a] + [m.module for m in split_m])


def _install_sequence(seq: _SequencePlan, state: _SequenceState, group: str, rank: int) -> None:
    world = state.world

    def first_hidden(args, kwargs):
        if args:
            return args[0], lambda x: ((x,) + tuple(args[1:]), kwargs)
        return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})

    def split(module, args, kwargs):
        x, put = first_hidden(args, kwargs)
        d = _seq_dim(x)
        state.active = x.shape[d] % world == 0 and x.shape[d] >= world
        if not state.active:
            return None
        n = x.shape[d] // world
        return put(x.narrow(d, rank * n, n))

    def gather(module, args, kwargs):
        if not state.active:
            return None
        x, put = first_hidden(args, kwargs)
        return put(all_gather(x, _seq_dim(x), group))

    def gather_output(module, args, out):
        if not state.active:
            return None
        if isinstance(out, tuple):  # older Hugging Face blocks return (hidden_states, ...)
            return (all_gather(out[0], _seq_dim(out[0]), group),) + out[1:]
        return all_gather(out, _seq_dim(out), group)

    seq.first_block.register_forward_pre_hook(split, with_kwargs=True)
    for m in seq.blocks:
        m.register_forward_pre_hook(gather, with_kwargs=True)
    # Gathered as the last block's output, not inside the final norm: a norm's own scope
    # must hold the norm alone for the rmsnorm pass to take it.
    seq.last_block.register_forward_hook(gather_output)


# ----------------------------------------------------------------------------- report

def _report(report, plan, info: ShardInfo) -> None:
    """Report entries: one for the degree (every split module), one per plan style rule."""
    if report is None:
        return
    from ..apply import RuleReport
    par = plan.parallel
    kinds = sorted({k for k, _ in info.collectives})
    kernel = f"torch.distributed functional collectives ({', '.join(kinds)}) over {info.backend}"
    inferred = sorted(p for p in info.places if info.source.get(p) is None)
    report.rules.append(RuleReport("parallel", 0, f"tensor {info.world}", "tensor", sorted(info.places), kernel,
                                   f"rank {info.rank} of {info.world}; inferred from the model's structure at "
                                   f"{len(inferred)} place(s)" + ("; sequence parallel" if info.sequence else "")))
    for i, rule in enumerate(par.styles):
        places = sorted(p for p, s in info.source.items() if s == i)
        report.rules.append(RuleReport("parallel.styles", i, rule.style, rule.at, places,
                                       kernel if rule.style != "replicate" else "none",
                                       "" if places else "won no linear or embedding"))
    heads = {(v["q_heads"][1] - v["q_heads"][0], v["kv_heads"][1] - v["kv_heads"][0], v["kv_replicated"])
             for v in info.attention.values()}
    for q, kv, rep in sorted(heads):
        report.notes.append(f"parallel: each rank computes {q} query head(s) and keeps {kv} KV head(s)"
                            + (" (KV heads replicated: the degree is a multiple of them)" if rep else "")
                            + "; the KV cache holds this rank's heads only")
    n_ar = sum(k == "all_reduce" for k, _ in info.collectives)
    n_ag = sum(k == "all_gather" for k, _ in info.collectives)
    report.notes.append(f"parallel: tensor {info.world} over {info.backend}: {n_ar} all-reduce(s) and {n_ag} "
                        "all-gather(s) per forward"
                        + ("; with sequence parallelism, the blocks' all-reduces become a reduce-scatter and an "
                           "all-gather where the degree divides the token count" if info.sequence else ""))
    report.notes.extend(f"parallel: {n}" for n in info.notes)
