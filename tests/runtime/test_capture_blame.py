"""A failed CUDA-graph capture names the module and op where it failed
(`passes.graphs.blame`): the planned graphs run node by node for one more attempt.

On the CPU no capture runs, so the failure is staged: the attention's PyTorch reference
raises what a host sync inside a capture raises, and `blame` runs one decode step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from planlang.plan import Plan
from planlang.runtime.apply import apply
from planlang.runtime.kernels import attention as attn_mod
from planlang.runtime.models.registry import build_builtin
from planlang.runtime.passes.graphs import BLAME, blame

from .kernel_switch import kernels

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"


def planned_tiny():
    model = build_builtin("llama-tiny", device=torch.device("cpu"), dtype=torch.float32)
    plan = Plan.model_validate({"planlang": 1, "name": "blame",
                                "fusions": ["rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention"]})
    with kernels(True):
        planned = apply(model, plan, max_batch=2, max_seq_len=64)
    return model, planned


def decode(planned):
    tok = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.tensor([3])

    def run():
        with torch.no_grad(), kernels(True):
            planned(tok, pos)
    return run


def test_a_failing_op_in_a_planned_graph_is_named_with_its_module(monkeypatch):
    model, planned = planned_tiny()
    run = decode(planned)
    assert blame(run) is None  # nothing fails: nothing to name
    real = attn_mod.attention_reference

    def failing(*args, **kwargs):
        raise RuntimeError(CAPTURE_ERROR)
    monkeypatch.setattr(attn_mod, "attention_reference", failing)
    where = blame(run)
    assert where is not None and where.startswith("layers.0.attn (planlang.")
    assert "attention" in where  # the op: planlang::attention or the rope_attention it merged into
    assert not BLAME.active and BLAME.node is None  # switched off again
    monkeypatch.setattr(attn_mod, "attention_reference", real)
    run()  # the ordinary path still runs the compiled graphs


class SyncsOnTheHost(nn.Module):
    """Foreign code between graphs: a host-side read that a capture cannot take."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if float(self.proj(x).sum()) > 1e9:  # the line blame names
            return x
        raise RuntimeError(CAPTURE_ERROR)


def test_a_failure_outside_the_traced_graphs_names_the_models_source_line():
    m = SyncsOnTheHost()
    with torch.no_grad():
        where = blame(lambda: m(torch.randn(2, 8)))
    assert where is not None and where.startswith("test_capture_blame.py:") and where.endswith("in forward")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bucket_whose_capture_fails_is_reported_at_its_module_and_runs_eagerly(monkeypatch):
    from planlang.runtime.passes.graphs import BucketRunner
    model = build_builtin("llama-tiny", device=torch.device("cuda"), dtype=torch.bfloat16)
    plan = Plan.model_validate({"planlang": 1, "name": "blame", "fusions": ["qkv", "attention"],
                                "graphs": {"capture": "cuda_graph", "buckets": [1, 2]}})
    planned = apply(model, plan, max_batch=2, max_seq_len=64)
    runner = planned._forward
    assert isinstance(runner, BucketRunner) and sorted(runner.graphs) == [1, 2]
    real = attn_mod.attention_triton

    def syncing(q, *args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            q.sum().item()  # a host sync: the capture fails here
        return real(q, *args, **kwargs)
    monkeypatch.setattr(attn_mod, "attention_triton", syncing)
    fresh = BucketRunner(runner.forward, [1, 2], runner.device, model.config.vocab_size)
    with pytest.raises(Exception, match="capturing bucket .* failed: at layers.0.attn"):
        fresh.capture()
    assert all(why.startswith("at layers.0.attn (planlang.attention") for why in fresh.report.failed.values())
    out = fresh(torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor([3], device="cuda"))
    assert out.shape[0] == 1  # eager through the same planned forward
