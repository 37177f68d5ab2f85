"""`memory.offload` and `memory.recompute` at apply time: outputs with offload equal outputs
without it (bitwise: the same kernels run), the weights really live in the ring slots, the
ring schedule survives more units than slots and calls out of order, a pinning failure is a
clear error before anything moves, and `lint --model` says when prefetch cannot hide the
copies. Training (gradients, updated weights) is tested in test_train.py.

On the CPU the ring runs its bookkeeping path (synchronous copies between CPU buffers):
every pointer swap and slot assignment of the CUDA path runs, only streams and events do
not. The GPU tests at the end run the same checks with streams, Inductor and CUDA graphs.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from planlang.plan import Plan
from planlang.runtime.apply import ApplyError, Report, apply
from planlang.runtime.memory import offload as offload_mod
from planlang.runtime.memory.offload import offload_diagnostics, prepare_offload, simulate_ring
from planlang.runtime.memory.recompute import apply_recompute
from planlang.runtime.models.registry import build_builtin
from .kernel_switch import kernels  # noqa: E402

B, PROMPT, STEPS, MAX_SEQ = 2, 5, 2, 16
FUSIONS = ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]


def make_plan(**doc) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, **doc})
    assert plan is not None, diags
    return plan


def reference_kernels():
    """The fused kernels' PyTorch reference (Triton's interpreter is slow and tested elsewhere)."""
    return kernels(reference=True)


def tokens(seed: int = 0, device="cpu") -> torch.Tensor:
    return torch.randint(0, 256, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed)).to(device)


def decode(model, toks: torch.Tensor) -> list[torch.Tensor]:
    """The logits of a prefill of PROMPT tokens and STEPS single-token steps."""
    dev = toks.device
    with torch.no_grad():
        out = [model(toks[:, :PROMPT], torch.arange(PROMPT, device=dev)).clone()]
        for p in range(PROMPT, PROMPT + STEPS):
            out.append(model(toks[:, p:p + 1], torch.tensor([p], device=dev)).clone())
    return out


def planned_llama(doc: dict, device="cpu", dtype=None):
    model = build_builtin("llama-tiny", device=device, dtype=dtype)
    return apply(model, make_plan(**doc), example_inputs=lambda m: decode(m, tokens(1, device)),
                 max_batch=B, max_seq_len=MAX_SEQ, device=torch.device(device))


@pytest.fixture(scope="module")
def fused_run():
    """A fused plan that offloads both layers through one slot, decoded with the ring armed
    and again disarmed (each layer back in its own memory; the same compiled graphs and
    kernels), both through the planned forward and by calling the model directly.

    It runs the path of torch before 2.13 (the GPU machine's): without storage pointer
    swaps every live tensor on a moved storage, the fused weights included, is found and
    `set_` onto the slot. `test_pointer_swap_moves_tensors_nobody_named` covers the swap."""
    with reference_kernels(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload_mod, "SWAP", False)
        planned = planned_llama({"fusions": FUSIONS, "memory": {"offload": [{"at": "layers.*", "prefetch": 0}]}})
        toks = tokens()
        off = planned.offload
        ring = off.rings[0]
        slot = ring.slots[0]
        span = (slot.data_ptr(), slot.data_ptr() + slot.numel())
        pointers = {"params": {n: p.data_ptr() for u in ring.units for n, p in u.module.named_parameters(prefix=u.path)},
                    "fused": [t.data_ptr() for t in planned.fused_weights.tensors.values()]}
        stats, report = off.stats(), planned.report
        armed = decode(planned, toks), decode(planned.model, toks)
        off.disarm()
        disarmed = decode(planned, toks), decode(planned.model, toks)
    return planned, span, pointers, stats, report, armed, disarmed


def test_offload_outputs_equal_outputs_without_it_bitwise(fused_run):
    *_, armed, disarmed = fused_run
    assert len(armed[0]) == 1 + STEPS
    for got, want in zip(armed[0], disarmed[0]):
        assert torch.equal(got, want)


def test_offload_outputs_equal_when_the_model_is_called_eagerly(fused_run):
    *_, armed, disarmed = fused_run
    for got, want in zip(armed[1], disarmed[1]):
        assert torch.equal(got, want)


def test_offload_keeps_every_fusion_site(fused_run):
    report = fused_run[4]
    places = {r.what: r.places for r in report.rules if r.section == "fusions"}
    assert places["qkv"] == ["layers.0.attn", "layers.1.attn"]
    assert places["swiglu"] == ["layers.0.mlp", "layers.1.mlp"]
    assert len(places["rmsnorm_residual"]) == 5


def test_offloaded_tensors_and_fused_weights_point_into_the_ring(fused_run):
    _, (lo, hi), pointers, *_ = fused_run
    assert pointers["fused"], "the fusions built fused weights"
    for name, ptr in pointers["params"].items():
        assert lo <= ptr < hi, name
    assert all(lo <= ptr < hi for ptr in pointers["fused"])
    # the two layers share the one slot: same addresses, different weights on the host
    assert pointers["params"]["layers.0.mlp.w2.weight"] == pointers["params"]["layers.1.mlp.w2.weight"]


@pytest.mark.skipif(not offload_mod.SWAP, reason="this torch has no storage pointer swap")
def test_pointer_swap_moves_tensors_nobody_named():
    """A fused weight the model does not hold (its parts are views of it) follows its storage."""
    from planlang.runtime.passes.fusions import FusedWeights
    model = build_builtin("llama-tiny")
    twin = build_builtin("llama-tiny")
    names = [(f"layers.1.attn.{n}", "weight") for n in ("wq", "wk", "wv")]
    fused = FusedWeights().concat(model, ("qkv", 1), names)
    want = fused.clone()
    off = prepare_offload(model, make_plan(memory={"offload": [{"at": "layers.*", "prefetch": 0}]}), "cpu", None, None)
    off.arm()
    slot = off.rings[0].slots[0]
    assert slot.data_ptr() <= fused.data_ptr() < slot.data_ptr() + slot.numel()
    with torch.no_grad():
        model.layers[0](torch.randn(1, 3, 64), torch.arange(3), *[t[:3] for t in (model.rope_cos, model.rope_sin)],
                        torch.ones(3, 3, dtype=torch.bool).tril())  # layer 0 now holds the slot
        assert not torch.equal(fused, want)
        model.layers[1](torch.randn(1, 3, 64), torch.arange(3), *[t[:3] for t in (model.rope_cos, model.rope_sin)],
                        torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.equal(fused, want)  # the fused weight reads layer 1's weights whenever layer 1 runs
    off.close()
    assert torch.equal(fused, want) and not (slot.data_ptr() <= fused.data_ptr() < slot.data_ptr() + slot.numel())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_offload_report_says_what_the_ring_holds(fused_run):
    stats, report = fused_run[3], fused_run[4]
    rule = next(r for r in report.rules if r.section == "memory.offload")
    assert rule.places == ["layers.0", "layers.1"] and "bookkeeping" in rule.kernel
    assert stats["rings"][0]["depth"] == 1
    assert stats["ring_bytes"] * 2 == stats["layer_bytes"]  # one slot for two equal layers
    assert "instead of" in rule.note and any("bookkeeping path" in n for n in report.notes)


class Stack(nn.Module):
    """A test-local model: six residual MLP blocks of different widths."""

    def __init__(self, dim=16, n=6):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim * (1 + i % 3)), nn.GELU(),
                                                  nn.Linear(dim * (1 + i % 3), dim)) for i in range(n))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def stack_pair(prefetch: int):
    torch.manual_seed(0)
    twin = Stack()
    model = Stack()
    model.load_state_dict(twin.state_dict())
    x = torch.randn(4, 16)
    off = prepare_offload(model, make_plan(memory={"offload": [{"at": "layers[1:]", "prefetch": prefetch}]}),
                          "cpu", None, None)
    off.arm()
    return twin, model, off, x


def test_ring_serves_more_units_than_slots_and_calls_out_of_order():
    twin, model, off, x = stack_pair(prefetch=1)
    ring = off.rings[0]
    assert (len(ring.units), ring.depth) == (5, 2)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
        for i in (4, 2, 3, 1, 5):  # one layer at a time, in any order: each call fetches what it needs
            assert torch.equal(model.layers[i](x), twin.layers[i](x))
        assert torch.equal(model(x + 1), twin(x + 1))


def test_disarm_gives_the_weights_back():
    twin, model, off, x = stack_pair(prefetch=0)
    off.close()
    ptrs = {p.data_ptr() for layer in model.layers for p in layer.parameters()}
    assert len(ptrs) == sum(1 for layer in model.layers for _ in layer.parameters())  # own memory again
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_pinning_failure_is_a_clear_error_before_anything_moves(monkeypatch):
    model = Stack()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    real_empty = torch.empty

    def no_pinned(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real_empty(*args, **kwargs)
    monkeypatch.setattr(offload_mod.torch, "empty", no_pinned)
    plan = make_plan(memory={"offload": [{"at": "layers.*"}]})
    with pytest.raises(ApplyError) as exc:
        prepare_offload(model, plan, torch.device("cuda"), None, None)
    d = exc.value.diagnostics[0]
    assert d.severity == "error" and "cannot pin" in d.message and "layers.*" in d.message
    assert "ulimit" in d.hint
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])


def test_recompute_in_inference_only_notes_it():
    model = Stack()
    report = Report("p", "cpu", "reference")
    done = apply_recompute(model, make_plan(memory={"recompute": [{"at": "layers.*", "policy": "full"}]}), report, None)
    assert done == {} and any("inference mode" in n for n in report.notes)
    assert all("forward" not in layer.__dict__ for layer in model.layers)


# ----------------------------------------------------------------------------- lint with a model

def test_ring_simulation_hides_copies_only_when_compute_allows():
    # three offloaded modules after 10 s of other compute; each copies in 1 s, computes in 2 s
    assert simulate_ring([None, 1, 1, 1], [10, 2, 2, 2], depth=2) == 16
    # depth 1 serializes copy and compute of every module after the first
    assert simulate_ring([None, 1, 1, 1], [10, 2, 2, 2], depth=1) == 18
    # link-bound: copies of 3 s against 1 s of compute, whatever the depth
    assert simulate_ring([3, 3, 3], [1, 1, 1], depth=3) == 10


@pytest.fixture(scope="module")
def llama_1b_shapes():
    from planlang.hardware import load_catalog
    from planlang.runtime.modelcheck import shape_model
    return shape_model("builtin:llama-1b"), load_catalog().get("h100")


def test_lint_warns_when_decode_is_link_bound(llama_1b_shapes):
    model, h100 = llama_1b_shapes
    diags = offload_diagnostics(model, make_plan(memory={"offload": [{"at": "layers.*", "prefetch": 1}]}), None, h100)
    assert [d.code for d in diags] == ["PL403"]
    assert diags[0].severity == "warning" and "host link" in diags[0].message
    assert "no prefetch depth" in diags[0].hint


def test_lint_names_the_prefetch_depth_that_hides_the_copies(llama_1b_shapes):
    model, h100 = llama_1b_shapes
    doc = {"mode": "training", "limits": {"max_batch": 2, "max_seq_len": 2048},
           "memory": {"offload": [{"at": "layers[12:16]", "prefetch": 0}]}}
    diags = offload_diagnostics(model, make_plan(**doc), None, h100)
    assert [d.code for d in diags] == ["PL403"] and "prefetch 1 hides" in diags[0].hint
    doc["memory"]["offload"][0]["prefetch"] = 1
    assert offload_diagnostics(model, make_plan(**doc), None, h100) == []


def test_lint_is_quiet_without_host_link_figures(llama_1b_shapes):
    model, _ = llama_1b_shapes
    plan = make_plan(memory={"offload": [{"at": "layers.*"}]})
    assert offload_diagnostics(model, plan, None, None) == []


# ----------------------------------------------------------------------------- on the GPU

def cuda_pair(doc_plain: dict, doc_streamed: dict, dtype=torch.float32):
    plain = planned_llama(doc_plain, "cuda", dtype)
    streamed = planned_llama(doc_streamed, "cuda", dtype)
    toks = tokens(device="cuda")
    return plain, streamed, decode(plain, toks), decode(streamed, toks)


@pytest.mark.gpu
def test_gpu_offload_fused_and_captured_equals_no_offload_bitwise():
    graphs = {"capture": "cuda_graph", "buckets": [1, 2]}
    off = {"offload": [{"at": "layers.*", "prefetch": 0}]}  # one slot for both layers
    plain, streamed, want, got = cuda_pair({"fusions": FUSIONS, "graphs": graphs},
                                           {"fusions": FUSIONS, "graphs": graphs, "memory": off})
    assert sorted(streamed.report.graphs["buckets"]) == [1, 2], streamed.report.notes
    assert "side-stream" in next(r for r in streamed.report.rules if r.section == "memory.offload").kernel
    for g, w in zip(got, want):  # prefill eager, decode steps replayed from the captured graphs
        assert torch.equal(g, w)
    toks = tokens(device="cuda")
    for g, w in zip(decode(streamed.model, toks), decode(plain.model, toks)):  # the modules called directly
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_gpu_offload_under_inductor_equals_no_offload_bitwise():
    """One compiled model, decoded with the ring armed and again disarmed (same graphs)."""
    planned = planned_llama({"compile": {"mode": "default"}, "memory": {"offload": [{"at": "layers.*", "prefetch": 0}]}},
                            "cuda", torch.bfloat16)
    toks = tokens(device="cuda")
    armed = decode(planned, toks)
    planned.offload.disarm()
    for g, w in zip(armed, decode(planned, toks)):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_gpu_offload_frees_device_memory_and_keeps_the_ring():
    from planlang.runtime.models.llama import ModelConfig, Transformer
    cfg = ModelConfig(dim=1024, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=4096, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", torch.bfloat16)
    layer = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    planned = apply(model, make_plan(memory={"offload": [{"at": "layers.*", "prefetch": 1}]}),
                    max_batch=1, max_seq_len=64)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    stats = planned.offload.stats()
    assert stats["ring_bytes"] <= 2 * layer * 1.01 + 4096
    assert freed >= 6 * layer - stats["ring_bytes"] - 8 * 2**20  # caches and graphs aside
    x = torch.randint(0, 512, (1, 8), device="cuda")
    with torch.no_grad():
        assert planned(x, torch.arange(8, device="cuda")).isfinite().all()

