"""`report.dtypes`: the dtype every GEMM and op kind runs in after apply."""
from __future__ import annotations

import torch

from planlang.plan import Plan
from planlang.runtime.apply import apply
from planlang.runtime.models.registry import build_builtin

from .kernel_switch import kernels


def test_every_gemm_and_op_kind_has_its_dtype_in_the_report():
    model = build_builtin("llama-tiny", device=torch.device("cpu"), dtype=torch.float32)
    plan = Plan.model_validate({"planlang": 1, "name": "d", "fusions": ["linear"], "precision": {"rules": [
        {"at": "layers.0.**:linear", "dtype": "fp8_e4m3", "emulate": True}]}})
    with kernels(True):
        planned = apply(model, plan, max_batch=1, max_seq_len=32)
    d = planned.report.dtypes
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(d["gemms"]) == linears and d["lm_head"] == ["lm_head"]
    assert {n for n, dt in d["gemms"].items() if dt.startswith("fp8_e4m3")} == {n for n in linears if n.startswith("layers.0.")}
    assert d["gemms"]["layers.1.attn.wq"] == d["gemms"]["lm_head"] == "fp32"  # the model's own
    assert d["ops"]["norm"] == d["ops"]["softmax"] == "fp32" and d["ops"]["kv_cache"] == "fp32"
