"""The `precision` section applied to a model: which dtype each GEMM and op runs in.

Rules (the preset's first, then the plan's own) are resolved once against the model's
module names; for an operation at module path P of op kind K (spec §3: `linear`,
`lm_head`, `norm`, `qk`, ...) the LAST rule whose selector covers P and whose op suffix is
K or absent wins. A GEMM's precision is a `GemmPrecision`; the graph passes ask
`PrecisionMap.gemm(paths)` when they rewrite a linear, a fused QKV or a fused gate/up GEMM:

- no rule, or the weight's own dtype: nothing changes;
- another base dtype (fp32, tf32, fp16, bf16): the weight is cast once at apply time and
  the input and output are cast at the op boundary;
- `fp8_e4m3` / `fp8_e5m2`: the weight is quantized once (tensor, channel or block scales,
  `runtime/precision/formats.py`) and the op becomes `planlang::fp8_linear` (weight-only:
  `activations: keep`) or `planlang::fp8_linear_dynamic` (activations scaled per token,
  per tensor or per block at every call);
- `mxfp8` / `nvfp4` / `mxfp4` with `activations: per_block` on sm_100+ (the gate:
  `precision.blackwell.native_kernel`): the weight is quantized once into the packed layout
  `torch._scaled_mm` takes and the op becomes `planlang::block_scaled_linear` (the input
  quantized in the format's blocks at every call); elsewhere `check_device` refuses them;
- `emulate: true` (and a block-format weight whose shape `_scaled_mm` does not take, or a
  block format on the CPU): the weight is quantized and dequantized once (kept in FP32) and
  the input quantize-dequantized at the op boundary (`per_block`), then one FP32 GEMM: the
  numbers of the format, not its speed.

The parts of a fused GEMM must agree; where they do not, the fusion is not made at that
site (the pass reports it skipped, with both rules).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from planlang import names
from planlang.plan import Plan, PrecisionRule
from planlang.selectors import Selector, resolve

TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GEMM_OPS = ("linear", "lm_head")


@dataclass(frozen=True)
class GemmPrecision:
    """How one GEMM computes: the rule that won there, in effective terms."""

    dtype: str
    scaling: Optional[str]
    block_size: Optional[int]
    activations: str
    emulate: bool
    rule: int          # index into Plan.precision_rules() (the preset's rules first)
    at: str            # the winning rule's selector, for messages

    @classmethod
    def of(cls, index: int, rule: PrecisionRule) -> "GemmPrecision":
        return cls(rule.dtype, rule.effective_scaling(), rule.effective_block_size(),
                   rule.effective_activations(), rule.emulate, index, rule.at)

    @property
    def numerics(self) -> tuple:
        """What must agree between the parts of a fused GEMM."""
        return (self.dtype, self.scaling, self.block_size, self.activations, self.emulate)

    @property
    def fp8(self) -> bool:
        return self.dtype in names.FP8_DTYPES

    @property
    def block_format(self) -> bool:
        return self.dtype in names.BLOCK_DTYPES

    def describe(self) -> str:
        if self.dtype in TORCH_DTYPES:
            return self.dtype
        parts = [self.dtype]
        if self.fp8:
            parts.append(f"{self.scaling} scales" + (f" of {self.block_size}" if self.scaling == "block" else ""))
            parts.append("weight-only" if self.activations == "keep" else f"activations {self.activations}")
        elif self.activations != "keep":
            parts.append(f"activations {self.activations}")
        if self.emulate:
            parts.append("emulated")
        return ", ".join(parts)


def _ancestors_and_self(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _vocab_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size", None)


def _input_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if isinstance(emb, nn.Embedding):
        return emb
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab = _vocab_size(model)
    sized = [m for m in embeddings if vocab is None or m.num_embeddings == vocab]
    return sized[0] if sized else None


def _in_repeated_block(path: str) -> bool:
    """`layers.3.mlp.w2` is inside a repeated block (a ModuleList/Sequential index)."""
    return any(part.isdigit() for part in path.split("."))


def lm_head_paths(model: nn.Module) -> set[str]:
    """The module computing the logits (a set of at most one path), found as
    `modelcheck.op_of` finds it where the model names it:

    1. the model's `lm_head` attribute, else HF's `get_output_embeddings()`;
    2. else the linear whose weight is the input embedding's (tied embeddings);
    3. else, by shape, a linear as wide as the vocabulary (the config's `vocab_size`, else
       the input embedding's rows): the last one in module order outside any repeated block,
       else the last one. The shape alone is not enough: a model whose hidden size equals
       its vocabulary (llama-tiny-trained: 256 and 256) has such linears in every layer."""
    named = {id(m): n for n, m in model.named_modules()}
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
    if isinstance(head, nn.Module) and id(head) in named:
        return {named[id(head)]}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    emb = _input_embedding(model)
    if emb is not None:
        tied = [n for n, m in linears if m.weight is emb.weight]
        if tied:
            return {tied[-1]}
    vocab = _vocab_size(model) or (emb.num_embeddings if emb is not None else None)
    if vocab is None:
        return set()
    wide = [n for n, m in linears if m.out_features == vocab]
    outside = [n for n in wide if not _in_repeated_block(n)]
    pick = outside or wide
    return {pick[-1]} if pick else set()


class PrecisionMap:
    """The plan's precision rules resolved against one model."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.plan = plan
        self.rules = plan.precision_rules()
        module_names = [n for n, _ in model.named_modules()]
        self._named = [set(resolve(Selector.parse(r.at), module_names)) for r in self.rules]
        self._ops = [Selector.parse(r.at).op for r in self.rules]
        self.lm_heads = lm_head_paths(model)
        self.model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, path: str, op: str) -> Optional[tuple[int, PrecisionRule]]:
        """The winning rule for operation kind `op` at module `path` (last match wins)."""
        covering = _ancestors_and_self(path)
        for i in range(len(self.rules) - 1, -1, -1):
            if self._ops[i] not in (None, op):
                continue
            if any(p in self._named[i] for p in covering):
                return i, self.rules[i]
        return None

    def op_kind(self, path: str) -> str:
        return "lm_head" if path in self.lm_heads else "linear"

    def gemm(self, path: str, weight_dtype: Optional[torch.dtype] = None) -> Optional[GemmPrecision]:
        """The precision of the GEMM at `path`; None where it runs as the model wrote it."""
        hit = self.rule_for(path, self.op_kind(path))
        if hit is None:
            return None
        spec = GemmPrecision.of(*hit)
        if spec.dtype in TORCH_DTYPES and spec.dtype != "tf32" and \
                TORCH_DTYPES[spec.dtype] == (weight_dtype or self.model_dtype):
            return None
        return spec

    def fused(self, paths: Sequence[str], weight_dtype: Optional[torch.dtype] = None):
        """(precision, None) for the parts of one fused GEMM, or (None, why) when they disagree."""
        specs = [self.gemm(p, weight_dtype) for p in paths]
        keys = {s.numerics if s is not None else None for s in specs}
        if len(keys) > 1:
            shown = ", ".join(f"{p}: {s.describe() if s else 'as written'}" for p, s in zip(paths, specs))
            return None, f"skipped: its parts run in different precisions ({shown})"
        return specs[0], None


# ----------------------------------------------------------------------------- weights

@dataclass
class PreparedWeight:
    """A GEMM weight as the plan's precision stores it (made once, at apply time)."""

    data: torch.Tensor                 # fp8 / fp4 codes, a cast copy, or the fp32 dequantized weight
    scale: Optional[torch.Tensor]      # fp8 scales (tensor [1], channel [N], block [N, K/b]), or the
                                       # swizzled block scales of MXFP8/NVFP4/MXFP4; else None
    kernel: str                        # what will run, for the report
    tensor_scale: Optional[torch.Tensor] = None  # NVFP4 on sm_100+: each row's part's FP32 scale, [N]


def prepare_weight(w: torch.Tensor, spec: GemmPrecision, parts: Optional[Sequence[int]] = None) -> PreparedWeight:
    """Quantize, cast or fake-quantize `w` ([N, K], nn.Linear layout) as `spec` says.

    `parts`: the row counts of the linears a fused weight concatenates. Each part is
    quantized on its own, as the rule says for each linear, so a per-tensor scale (FP8
    `tensor`, NVFP4's FP32 scale) is the part's, never the fused tensor's; an FP8 tensor
    scale is then stored as a per-row vector, which the kernels read as channel scales."""
    from ..precision import blackwell, formats
    w = w.detach()
    parts = list(parts) if parts else [w.shape[0]]
    if spec.dtype in TORCH_DTYPES:
        return PreparedWeight(w.to(TORCH_DTYPES[spec.dtype]).contiguous(), None, f"{spec.dtype} GEMM")
    if spec.fp8 and not spec.emulate:
        datas, scales = [], []
        for piece in w.split(parts, dim=0):
            q = formats.quantize_fp8(piece, dtype=spec.dtype, scaling=spec.scaling, block_size=spec.block_size or 128)
            datas.append(q.data)
            scales.append(q.scale.float().expand(piece.shape[0]) if spec.scaling == "tensor" else q.scale.float())
        scale = scales[0] if len(parts) == 1 else torch.cat(scales, dim=0)
        kind = "fp8_linear" if spec.activations == "keep" else "fp8_linear_dynamic"
        return PreparedWeight(torch.cat(datas, dim=0).contiguous(), scale.contiguous(), kind)
    capability = blackwell.device_capability(w.device) if spec.block_format and not spec.emulate else None
    if capability is not None:
        kernel, _, _ = blackwell.native_kernel(spec.dtype, spec.activations, capability)
        if kernel is not None and blackwell.fits(*w.shape):
            op = blackwell.prepare_block_weight(w, spec.dtype, parts)
            return PreparedWeight(op.data, op.scale, kernel, op.tensor_scale)
    fq = torch.cat([formats.fake_quantize(piece.float(), spec.dtype, scaling=spec.scaling, block_size=spec.block_size)
                    for piece in w.split(parts, dim=0)], dim=0)
    return PreparedWeight(fq.contiguous(), None, "emulated_linear")


def check_device(pmap: PrecisionMap, device: torch.device) -> list[tuple[int, str, str]]:
    """(rule index, message, hint) for each rule the device cannot run: the capability
    model's gates, checked again at apply time against the device present."""
    if device.type != "cuda":
        return []
    major, minor = torch.cuda.get_device_capability(device)
    sm = major * 10 + minor
    out = []
    emulate = "or add emulate: true to study the format's accuracy as quantize-dequantize"
    for i, rule in enumerate(pmap.rules):
        if rule.emulate:
            continue
        if rule.dtype in names.FP8_DTYPES and sm < 89:
            out.append((i, f"{rule.dtype} needs sm_89+ (Ada, Hopper); this device is sm_{sm}",
                        f"use bf16 on this device, {emulate}"))
        elif rule.dtype in names.BLOCK_DTYPES:
            from ..precision.blackwell import native_kernel
            kernel, why, hint = native_kernel(rule.dtype, rule.effective_activations(), (major, minor))
            if kernel is None:
                out.append((i, why, f"{hint}, {emulate}"))
    return out


def rule_path(plan: Plan, index: int) -> tuple:
    """Where rule `index` of `Plan.precision_rules()` is written (a preset's rules: the preset)."""
    n_preset = len(plan.precision_rules()) - len(plan.precision.rules)
    return ("precision", "preset") if index < n_preset else ("precision", "rules", index - n_preset)


# ----------------------------------------------------------------------------- the graph

def emit_gemm(view, before, x, w: torch.Tensor, bias, key: tuple, spec: GemmPrecision, weights,
              as_written, act: Optional[str] = None):
    """Insert, before node `before`, the GEMM `x @ w.T (+ bias)` (with `act`-mul for a fused
    gate/up weight) in the precision `spec` says; returns the node of its output.

    `as_written(x_node, w_node, b_node)` inserts the op the graph would run without a
    precision rule (for base-dtype casts, which keep the kernel and change the dtype)."""
    from ..kernels import emulated  # noqa: F401  (registers planlang::emulated_linear)
    from .fusions import _get_attr
    from .graph import shape_dtype
    g = view.graph
    if spec.fp8 and not spec.emulate:
        from ..kernels import fp8_linear  # noqa: F401  (registers planlang::fp8_linear*)
    from ..precision.blackwell import KERNELS as BLOCK_KERNELS  # registers planlang::block_scaled_linear
    prepared = weights.prepared(key, w, spec)
    sd = shape_dtype(x)
    x_dtype = sd[1] if sd is not None else weights.precision.model_dtype
    weights.last_by_rows = kernels_by_rows(prepared, spec, x_dtype, act, bias is not None)
    w_node = _get_attr(view, key + ("w",) + spec.numerics, prepared.data, before)
    if spec.dtype in TORCH_DTYPES:
        dt = TORCH_DTYPES[spec.dtype]
        with g.inserting_before(before):
            xc = g.call_method("to", (x, dt))
            bc = g.call_method("to", (bias, dt)) if bias is not None else None
        with g.inserting_before(before):
            y = as_written(xc, w_node, bc)
            return g.call_method("to", (y, x_dtype))
    with g.inserting_before(before):
        if prepared.kernel in ("fp8_linear", "fp8_linear_dynamic") + tuple(BLOCK_KERNELS.values()):
            s_node = _get_attr(view, key + ("scale",) + spec.numerics, prepared.scale, before)
        if prepared.kernel in BLOCK_KERNELS.values():
            t_node = None if prepared.tensor_scale is None else \
                _get_attr(view, key + ("tensor_scale",) + spec.numerics, prepared.tensor_scale, before)
            return g.call_function(torch.ops.planlang.block_scaled_linear.default,
                                   (x, w_node, s_node, t_node, bias, spec.dtype, act))
        if prepared.kernel == "fp8_linear":
            return g.call_function(torch.ops.planlang.fp8_linear.default,
                                   (x, w_node, s_node, bias, spec.block_size or 0, act))
        if prepared.kernel == "fp8_linear_dynamic":
            return g.call_function(torch.ops.planlang.fp8_linear_dynamic.default,
                                   (x, w_node, s_node, bias, spec.activations, spec.block_size or 0, act))
        fmt = spec.dtype if spec.activations != "keep" else ""
        return g.call_function(torch.ops.planlang.emulated_linear.default,
                               (x, w_node, bias, fmt, spec.activations, spec.block_size or 0, act))


REPORT_ROWS = (1, 16, 2048)  # decode at batch 1 and 16, a prefill: the kernel each takes


def kernels_by_rows(prepared: PreparedWeight, spec: GemmPrecision, x_dtype: torch.dtype, act: Optional[str],
                    has_bias: bool) -> dict[int, str]:
    """For an FP8 GEMM, the kernel each row count in REPORT_ROWS takes (the dispatch is per
    shape; every choice computes the rule's numbers up to accumulation order)."""
    if prepared.kernel not in ("fp8_linear", "fp8_linear_dynamic"):
        return {}
    from ..kernels.fp8_linear import fp8_kernel_name
    n, k = prepared.data.shape
    return {m: fp8_kernel_name(m, n, k, act=act, scaling=spec.scaling, block_size=spec.block_size or 0,
                               act_mode=spec.activations, x_dtype=x_dtype, w_dtype=prepared.data.dtype,
                               has_bias=has_bias, device=prepared.data.device) for m in REPORT_ROWS}


def record(weights, paths: Sequence[str], spec: GemmPrecision, kernel: str, by_rows: Optional[dict] = None) -> None:
    """Note, for the report, that the GEMM of `paths` runs as `spec` says with `kernel`."""
    weights.precision_log.setdefault(spec.rule, {})
    for p in paths:
        weights.precision_log[spec.rule][p] = (spec.describe(), kernel, by_rows or {})


class PrecisionPass:
    """Linears no fusion took (the plan has no `linear` fusion, or a rule narrowed it):
    each with a precision rule becomes the op its rule says."""

    kind = "precision"

    def rewrite_graph(self, view, weights) -> int:
        from .graph import LINEAR_TARGETS, adopt, erase_unused, is_call, node_module
        done = 0
        for n in list(view.graph.nodes):
            if not is_call(n, LINEAR_TARGETS):
                continue
            w = view.linear_weight(n)
            if w is None or w[1].dim() != 2:
                continue
            path = node_module(n) or w[0]
            spec = weights.precision.gemm(path, w[1].dtype)
            if spec is None:
                continue
            args = list(n.args) + [None] * (3 - len(n.args))
            x, b = args[0], n.kwargs.get("bias", args[2])
            out = emit_gemm(view, n, x, w[1], b, ("linear", path), spec, weights,
                            lambda xc, wn, bc: view.graph.call_function(torch.nn.functional.linear, (xc, wn, bc)))
            adopt(out, n)
            n.replace_all_uses_with(out)
            erase_unused(view.graph, [n])
            record(weights, [path], spec, weights.prepared(("linear", path), w[1], spec).kernel, weights.last_by_rows)
            done += 1
        return done


# ----------------------------------------------------------------------------- per-rule error

def run_gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], spec: GemmPrecision) -> torch.Tensor:
    """One GEMM computed as `spec` says (the op the rewritten graph calls), standalone."""
    prepared = prepare_weight(w, spec)
    if prepared.kernel == "fp8_linear":
        return torch.ops.planlang.fp8_linear.default(x, prepared.data, prepared.scale, bias, spec.block_size or 0, None)
    if prepared.kernel == "fp8_linear_dynamic":
        return torch.ops.planlang.fp8_linear_dynamic.default(x, prepared.data, prepared.scale, bias, spec.activations,
                                                             spec.block_size or 0, None)
    from ..precision import blackwell
    if prepared.kernel in blackwell.KERNELS.values():
        return blackwell.block_scaled_linear(x, prepared.data, prepared.scale, prepared.tensor_scale, bias,
                                             spec.dtype, None)
    if prepared.kernel == "emulated_linear":
        from ..kernels.emulated import emulated_linear
        fmt = spec.dtype if spec.activations != "keep" else ""
        return emulated_linear(x, prepared.data, bias, fmt, spec.activations, spec.block_size or 0, None)
    dt = TORCH_DTYPES[spec.dtype]
    return torch.nn.functional.linear(x.to(dt), prepared.data, bias.to(dt) if bias is not None else None).to(x.dtype)


def _keep_input(store: dict, path: str, module, args) -> None:
    store.setdefault(path, args[0].detach().clone())


@torch.no_grad()
def gemm_errors(model: nn.Module, pmap: PrecisionMap, run) -> dict[int, dict]:
    """Per precision rule: the relative error of the GEMM outputs it changes, on the inputs
    those GEMMs see when `run(model)` runs the unplanned model once.

    Returns {rule index: {"rel_error": ||y' - y|| / ||y|| over all its GEMMs, "gemms": n,
    "worst": [path, rel_error]}}."""
    if not pmap:
        return {}
    from ..kernels import emulated  # noqa: F401
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    specs = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            spec = pmap.gemm(path, mod.weight.dtype)
            if spec is not None:
                specs[path] = (mod, spec)
                hooks.append(mod.register_forward_pre_hook(functools.partial(_keep_input, inputs, path)))
    if not specs:
        return {}
    if any(s.fp8 and not s.emulate for _, s in specs.values()):
        from ..kernels import fp8_linear  # noqa: F401
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    sums: dict[int, list] = {}
    for path, (mod, spec) in specs.items():
        x = inputs.get(path)
        if x is None:
            continue
        ref = torch.nn.functional.linear(x.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())
        got = run_gemm(x, mod.weight, mod.bias, spec).float()
        num, den = (got - ref).norm().item() ** 2, ref.norm().item() ** 2
        acc = sums.setdefault(spec.rule, [0.0, 0.0, 0, ("", 0.0)])
        acc[0] += num
        acc[1] += den
        acc[2] += 1
        err = (num / den) ** 0.5 if den else 0.0
        if err >= acc[3][1]:
            acc[3] = (path, err)
    return {i: {"rel_error": (a[0] / a[1]) ** 0.5 if a[1] else 0.0, "gemms": a[2], "worst": list(a[3])}
            for i, a in sums.items()}
