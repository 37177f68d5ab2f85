"""`apply` on a decoder written nothing like the built-in one: attributes `query/key/value/out`
and `fc_gate/fc_up/fc_down`, its own RMSNorm spelled another way, residual adds written as
`torch.add(h, out)` and `h += ...`, the gated product in the other order, rotary tables read
at the positions, a static cache written with `index_copy_`, and SDPA with `enable_gqa`.
The passes match the computation, so the report names the model's own modules
(`cells.0.mix`, ...), and a look-alike that computes something else (a LayerNorm without
bias, a gelu without tanh) is left alone.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planlang.plan import Plan
from planlang.runtime.apply import PASSES, apply

DIM, HEADS, KV_HEADS, HEAD, FFN, VOCAB, CELLS = 64, 4, 2, 16, 96, 128, 2
B, PROMPT, STEPS, SLOTS = 2, 4, 2, 12
F32_TOL = 1e-5


class ScaleNorm(nn.Module):
    """RMSNorm written another way: gain first, `variance_epsilon`, `dim=` keyword."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.scale * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.variance_epsilon))


class CenteredNorm(nn.Module):
    """A LayerNorm without bias: rsqrt, mean and one gain, like an RMSNorm, but centred.
    Fusing it as an RMSNorm would be wrong."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


def rotate(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Mix(nn.Module):
    """Attention: rotary tables indexed at the positions, a static cache written with
    index_copy_, SDPA over the whole cache with a position mask and enable_gqa."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(DIM, HEADS * HEAD, bias=False)
        self.key = nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
        self.value = nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
        self.out = nn.Linear(HEADS * HEAD, DIM, bias=False)
        self.register_buffer("keys", torch.zeros(B, KV_HEADS, SLOTS, HEAD))
        self.register_buffer("vals", torch.zeros(B, KV_HEADS, SLOTS, HEAD))

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        q = self.query(x).view(b, t, HEADS, HEAD).transpose(1, 2)
        k = self.key(x).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
        v = self.value(x).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
        q = (q * cos) + (rotate(q) * sin)
        k = (rotate(k) * sin) + (k * cos)
        self.keys.index_copy_(2, pos, k)
        self.vals.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.keys, self.vals, attn_mask=mask, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, t, HEADS * HEAD))


class Feed(nn.Module):
    def __init__(self, exact_gelu: bool = False):
        super().__init__()
        self.fc_gate = nn.Linear(DIM, FFN, bias=False)
        self.fc_up = nn.Linear(DIM, FFN, bias=False)
        self.fc_down = nn.Linear(FFN, DIM, bias=False)
        self.exact_gelu = exact_gelu

    def forward(self, x):
        if self.exact_gelu:  # erf gelu: the fused kernel's gelu is the tanh one, so no site
            return self.fc_down(self.fc_up(x) * F.gelu(self.fc_gate(x)))
        return self.fc_down(self.fc_up(x) * F.silu(self.fc_gate(x)))


class Cell(nn.Module):
    def __init__(self, exact_gelu: bool):
        super().__init__()
        self.pre, self.mix, self.post, self.ff = ScaleNorm(DIM), Mix(), ScaleNorm(DIM), Feed(exact_gelu)

    def forward(self, h, pos, cos, sin, mask):
        h = torch.add(h, self.mix(self.pre(h), pos, cos, sin, mask))
        h += self.ff(self.post(h))
        return h


class Foreign(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.cells = nn.ModuleList(Cell(exact_gelu=i == 1) for i in range(CELLS))
        self.final = CenteredNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2).float() / HEAD))
        ang = torch.outer(torch.arange(SLOTS).float(), inv)
        self.register_buffer("cos_t", torch.cat([ang, ang], -1).cos())
        self.register_buffer("sin_t", torch.cat([ang, ang], -1).sin())

    def forward(self, tokens, pos):
        h = self.tok(tokens)
        cos, sin = self.cos_t[pos], self.sin_t[pos]
        mask = torch.arange(SLOTS)[None, :] <= pos[:, None]
        for cell in self.cells:
            h = cell(h, pos, cos, sin, mask)
        return self.head(self.final(h))


def build() -> Foreign:
    torch.manual_seed(0)
    return Foreign().eval()


def make_plan(*fusions) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "fusions": list(fusions)})
    assert plan is not None, diags
    return plan


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decode(model, tokens):
    with torch.no_grad():
        out = [model(tokens[:, :PROMPT], torch.arange(PROMPT))]
        for p in range(PROMPT, PROMPT + STEPS):
            out.append(model(tokens[:, p:p + 1], torch.tensor([p])))
    return out


@pytest.fixture(scope="module")
def planned():
    model, twin = build(), build()
    tokens = torch.randint(0, VOCAB, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    done = []
    for fusion in PASSES.values():
        def rewrite(view, site, weights, _orig=fusion.rewrite):
            result = _orig(view, site, weights)
            done.append((site.kind, site.path, result))
            return result
        fusion.rewrite = rewrite
    try:
        plan = make_plan("rmsnorm_residual", "qkv", "rope_kvcache", "attention",
                         {"kind": "swiglu", "at": "cells.*.ff"})
        example = (tokens[:, :PROMPT], torch.arange(PROMPT))
        pm = apply(model, plan, example_inputs=example)
        got, want = decode(pm, tokens), decode(twin, tokens)
    finally:
        for fusion in PASSES.values():
            fusion.__dict__.pop("rewrite", None)
    return pm, got, want, done


def places(pm, kind):
    return next(r for r in pm.report.rules if r.what == kind).places


def test_the_report_names_the_models_own_modules(planned):
    pm = planned[0]
    assert places(pm, "qkv") == ["cells.0.mix", "cells.1.mix"]
    assert places(pm, "rope_kvcache") == ["cells.0.mix", "cells.1.mix"]
    assert places(pm, "attention") == ["cells.0.mix", "cells.1.mix"]
    assert places(pm, "rmsnorm_residual") == ["cells.0.post", "cells.0.pre", "cells.1.post", "cells.1.pre"]


def test_look_alikes_that_compute_something_else_are_left_alone(planned):
    pm = planned[0]
    # the centred norm and the erf-gelu feed-forward hold no site
    assert "final" not in places(pm, "rmsnorm_residual")
    assert places(pm, "swiglu") == ["cells.0.ff"]


def test_residual_adds_in_any_spelling_are_fused(planned):
    done = {(kind, path): result for kind, path, result in planned[3]}
    assert done["rmsnorm_residual", "cells.0.pre"] == "rmsnorm"  # reads the embeddings
    assert done["rmsnorm_residual", "cells.0.post"] == "rmsnorm_residual"  # torch.add(h, ...)
    assert done["rmsnorm_residual", "cells.1.pre"] == "rmsnorm_residual"  # h += ...
    assert done["swiglu", "cells.0.ff"] == "swiglu_linear"


def test_prefill_and_decode_match_the_unplanned_twin(planned):
    _, got, want, _ = planned
    assert len(got) == 1 + STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) < F32_TOL, f"call {step}"


def test_fused_weights_are_views_of_the_models_own_linears(planned):
    pm = planned[0]
    mix = pm.model.cells[0].mix
    fused = pm.fused_weights.tensors["qkv", ("cells.0.mix.query", "cells.0.mix.key", "cells.0.mix.value")]
    assert mix.value.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(fused, torch.cat([mix.query.weight, mix.key.weight, mix.value.weight]))


VARIANTS = ("top_left", "padded", "strict", "causal")


class Probe(nn.Module):
    """Attention over a static cache with masks the kernel must not take: SDPA's
    is_causal (aligned top-left, not at the positions), a causal mask with a padding term,
    a strict `<` mask (a query not seeing itself); and one it must take. Outputs are
    stacked in VARIANTS order."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.randn(B, KV_HEADS, SLOTS, HEAD))
        self.register_buffer("vals", torch.randn(B, KV_HEADS, SLOTS, HEAD))

    def forward(self, q, pos, keep):
        slots = torch.arange(SLOTS)
        causal = slots[None, :] <= pos[:, None]
        out = [F.scaled_dot_product_attention(q, self.keys, self.vals, is_causal=True, enable_gqa=True)]
        for mask in (causal & keep[None, :], slots[None, :] < pos[:, None], causal):
            out.append(F.scaled_dot_product_attention(q, self.keys, self.vals, attn_mask=mask, enable_gqa=True))
        return torch.stack(out)


def test_masks_the_kernel_cannot_honour_are_no_attention_site():
    from planlang.runtime.passes.attention import AttentionPass
    from planlang.runtime.passes.graph import capture

    q = torch.randn(B, HEADS, 3, HEAD)
    pos, keep = torch.arange(2, 5), torch.rand(SLOTS) > 0.3
    (view,) = capture(Probe().eval(), lambda m: m(q, pos, keep))
    stack = next(n for n in view.graph.nodes if n.target is torch.stack)
    name = dict(zip(stack.args[0], VARIANTS))  # SDPA node -> variant
    fusion = AttentionPass()
    assert {name[s.nodes["out"]] for s in fusion.find(view)} == {"causal"}
    reasons = {name[n]: fusion._sdpa(view, n) for n in stack.args[0]}
    assert "is_causal" in reasons["top_left"]
    assert "not a causal" in reasons["padded"] and "not a causal" in reasons["strict"]


class _Gate(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc_gate, self.fc_up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.fc_down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.fc_down(torch.nn.functional.silu(self.fc_gate(x)) * self.fc_up(x))


class _Broken(nn.Module):
    """Blocks whose forward breaks the Dynamo graph: the code after the break is one graph
    that every block runs with its own parameters as inputs."""

    def __init__(self, d=32, f=64, n=3):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(_Gate(d, f) for _ in range(n))
        self.head = nn.Linear(d, 50, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x * 1.0
            torch._dynamo.graph_break()
            x = x + b(x)
        if ids.dim() != 2:
            raise ValueError("ids must be [B, T]")
        return self.head(x)


@pytest.mark.parametrize("mode", ["none", "default"])
def test_a_graph_shared_by_blocks_gets_each_blocks_own_fused_weights(mode):
    import copy

    from planlang.plan import Plan
    from planlang.runtime.apply import apply
    torch.manual_seed(3)
    model = _Broken().eval()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 5))
    planned = apply(model, Plan.model_validate({"planlang": 1, "target": "auto", "fusions": ["swiglu"],
                                                "compile": {"mode": mode}}), example_inputs=(ids,))
    rule = next(r for r in planned.report.rules if r.what == "swiglu")
    assert rule.places == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        with pytest.raises(ValueError):  # a failed call (a recompile on the way) must not change later ones
            planned(torch.randint(0, 50, (5,)))
        for shape in [(2, 5), (3, 9)]:
            x = torch.randint(0, 50, shape)
            want = twin(x)
            torch.testing.assert_close(planned(x), want, rtol=1e-5, atol=1e-5)


def test_module_paths_are_the_named_modules_names_whatever_forward_calls_self():
    from planlang.runtime.passes.graph import module_path
    assert module_path("L['self'].layers[0].attn") == "layers.0.attn"
    assert module_path("L['s'].blocks[1].ln1") == "blocks.1.ln1"  # def forward(s, x)
    assert module_path("L['args'][0].mlp") == "mlp"
    assert module_path("L['self']._modules['a'].b") == "a.b"


def test_example_inputs_the_model_cannot_take_are_named_as_such():
    from planlang.plan import Plan
    from planlang.runtime.apply import apply
    model = _Broken().eval()
    plan = Plan.model_validate({"planlang": 1, "target": "auto", "fusions": ["swiglu"]})
    with pytest.raises(ValueError, match="fails on its example inputs, without any plan") as err:
        apply(model, plan, example_inputs=(torch.randn(2, 5),))  # float ids: the embedding refuses them
    assert "RuntimeError" in str(err.value) or "IndexError" in str(err.value)
