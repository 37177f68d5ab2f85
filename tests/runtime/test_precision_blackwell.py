"""MXFP8, NVFP4 and MXFP4 on Blackwell (runtime/precision/blackwell.py): the gate, the packed
layout `torch._scaled_mm` takes, and the GEMM on those operands, all on the CPU.

The layout reference is written from its definitions, not the module's code: E2M1 / E4M3 /
E8M0 values from `test_formats`' enumerated tables, two E2M1 codes a byte with element 2i in
the low nibble, and cuBLAS's 1D block-scaling-factor layout as an index formula. The real
`torch._scaled_mm` call is replaced by a reference that decodes the packed operands; only
the last test calls the real kernel, and it needs sm_100+.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planlang.loader import load
from planlang.runtime.kernels.emulated import emulated_linear
from planlang.runtime.passes.precision import GemmPrecision, PrecisionMap, check_device, prepare_weight
from planlang.runtime.precision import blackwell as bw
from planlang.runtime.precision import formats as fm

from .test_formats import E2M1, E4M3, e8m0_value, ref_pack, sample

BLOCK = {"mxfp8": 32, "nvfp4": 16, "mxfp4": 32}
FORMATS = tuple(BLOCK)
PLANS = Path(__file__).resolve().parents[2] / "plans"
E2M1_TABLE = torch.tensor([E2M1.value(c) for c in range(16)], dtype=torch.float32)
E4M3_TABLE = torch.tensor([E4M3.value(c) for c in range(256)], dtype=torch.float32)
E8M0_TABLE = torch.tensor([e8m0_value(c) for c in range(256)], dtype=torch.float32)


# ----------------------------------------------------------------------------- the reference
def ref_unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS's layout read back: tiles of 128 rows x 4 columns in row-major tile order,
    512 bytes each; (r, c) of a tile at (r % 32) * 16 + (r // 32) * 4 + c."""
    tiles_per_row = -(-cols // 4)
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(cols).unsqueeze(0)
    index = ((r // 128) * tiles_per_row + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat.view(torch.uint8)[index]


def ref_decode(op: bw.Operand, dtype: str, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(element values [rows, K], block scale values [rows, K / block]) of a packed operand."""
    codes = op.data.view(torch.uint8).long()
    if dtype == "mxfp8":
        values = E4M3_TABLE[codes]
    else:  # two codes a byte, element 2i in the low nibble
        values = E2M1_TABLE[torch.stack([codes & 15, codes >> 4], dim=-1).reshape(rows, -1)]
    scale_codes = ref_unswizzle(op.scale, rows, k // BLOCK[dtype]).long()
    scales = (E4M3_TABLE if dtype == "nvfp4" else E8M0_TABLE)[scale_codes]
    return values[:, :k], scales


def ref_dequantize(op: bw.Operand, dtype: str, rows: int, k: int) -> torch.Tensor:
    """The values a packed weight stands for, in the float32 steps of the format's rule."""
    values, scales = ref_decode(op, dtype, rows, k)
    if dtype == "nvfp4":
        scales = scales * op.tensor_scale.unsqueeze(-1)
    return values * scales.repeat_interleave(BLOCK[dtype], dim=-1)


def ref_scaled_mm(a, b_t, scale_a, scale_b):
    """What `torch._scaled_mm` computes from block-scaled operands: sum over K of
    (a element * its block scale) * (b element * its block scale), exactly (float64), FP32 out."""
    fmt = "mxfp8" if a.dtype == torch.float8_e4m3fn else "nvfp4" if scale_a.dtype == torch.float8_e4m3fn else "mxfp4"
    m, n = a.shape[0], b_t.shape[1]
    k = a.shape[1] * (1 if fmt == "mxfp8" else 2)
    sides = []
    for data, scale, rows in ((a, scale_a, m), (b_t.t(), scale_b, n)):
        values, scales = ref_decode(bw.Operand(data, scale, None), fmt, rows, k)
        sides.append(values.double() * scales.double().repeat_interleave(BLOCK[fmt], dim=-1))
    return (sides[0] @ sides[1].t()).float()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("capability,native", [((9, 0), False), ((10, 0), True), ((12, 0), True)])
def test_block_formats_run_natively_from_sm_100_with_per_block_activations(dtype, capability, native):
    kernel, why, _ = bw.native_kernel(dtype, "per_block", capability)
    assert (kernel == bw.KERNELS[dtype]) if native else (kernel is None and "needs sm_100+" in why)


@pytest.mark.parametrize("dtype", FORMATS)
def test_weight_only_block_formats_are_refused_on_blackwell(dtype):
    kernel, why, hint = bw.native_kernel(dtype, "keep", (10, 0))
    assert kernel is None and "weight-only" in why and "per_block" in hint


def test_the_b200_nvfp4_plan_passes_the_device_check_on_sm_100_only(monkeypatch):
    from planlang.runtime.models.registry import build_builtin
    pmap = PrecisionMap(build_builtin("llama-tiny"), load(PLANS / "b200_nvfp4.yaml"))
    for cap, refused in (((10, 0), []), ((12, 0), []), ((9, 0), [1])):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert [i for i, _, _ in check_device(pmap, torch.device("cuda"))] == refused


def test_a_missing_torch_api_is_refused_with_its_name(monkeypatch):
    monkeypatch.setattr(bw, "TORCH_API", ("_scaled_mm", "float4_e9m9_x2"))
    kernel, why, hint = bw.native_kernel("nvfp4", "per_block", (10, 0))
    assert kernel is None and "torch.float4_e9m9_x2" in why and "2.8" in hint


def test_on_the_cpu_a_block_format_weight_is_emulated():
    spec = GemmPrecision("nvfp4", "block", 16, "per_block", False, 0, "**")
    assert prepare_weight(torch.randn(32, 64), spec).kernel == "emulated_linear"


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 2), (128, 4), (130, 5), (256, 9)])
def test_the_scale_swizzle_is_cublas_tiled_layout(rows, cols):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    scale = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    flat = bw.swizzle_scales(scale)
    assert flat.numel() == (-(-rows // 128) * 128) * (-(-cols // 4) * 4)
    assert torch.equal(ref_unswizzle(flat, rows, cols), scale)


def test_float4_x2_holds_two_e2m1_codes_a_byte_even_element_low():
    codes = [[a, b] for a in range(16) for b in range(16)]
    x = E2M1_TABLE[torch.tensor(codes)].reshape(1, -1)
    op = bw.quantize_operand(x * 2.0 ** -10, "mxfp4")  # one E8M0 scale per block
    assert op.data.dtype == torch.float4_e2m1fn_x2 and op.data.shape == (1, 256)
    assert op.data.view(torch.uint8).reshape(-1).tolist() == ref_pack(codes)


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("parts", [None, [32, 16]])
def test_packed_weights_dequantize_bit_for_bit_to_the_emulation(dtype, parts):
    w = sample((48, 96), 3, -2, 6)
    op = bw.prepare_block_weight(w, dtype, parts)
    want = torch.cat([fm.fake_quantize(p, dtype) for p in w.split(parts or [48], dim=0)], dim=0)
    assert op.data.dtype == (torch.float8_e4m3fn if dtype == "mxfp8" else torch.float4_e2m1fn_x2)
    assert op.scale.dtype == (torch.float8_e4m3fn if dtype == "nvfp4" else torch.float8_e8m0fnu)
    assert (op.tensor_scale is not None) == (dtype == "nvfp4")
    assert torch.equal(ref_dequantize(op, dtype, 48, 96).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("act,parts,bias", [(None, None, True), ("silu", [32, 32], False)])
def test_the_gemm_on_packed_operands_computes_the_emulation(monkeypatch, dtype, act, parts, bias):
    monkeypatch.setattr(bw, "_scaled_mm", ref_scaled_mm)
    x = sample((2, 3, 64), 5, 0, 4)
    w = sample((64, 64), 6, -3, 4)
    b = torch.randn(64) if bias else None
    op = bw.prepare_block_weight(w, dtype, parts)
    wq = torch.cat([fm.fake_quantize(p, dtype) for p in w.split(parts or [64], dim=0)], dim=0)
    for xd, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):  # bf16: one rounding of the output
        got = bw.block_scaled_linear(x.to(xd), op.data, op.scale, op.tensor_scale, b, dtype, act)
        want = emulated_linear(x.to(xd), wq, b, dtype, "per_block", 0, act)
        assert got.dtype == xd and got.shape == want.shape == (2, 3, 32 if act else 64)
        assert rel(got, want) < tol


@pytest.mark.parametrize("dtype", FORMATS)
def test_apply_on_sm_100_runs_the_fused_gemms_on_packed_weights_with_the_emulations_numbers(monkeypatch, dtype):
    """The whole pass on the CPU, as on a Blackwell: the capability and the kernel are the
    only things replaced (by sm_100 and `ref_scaled_mm`)."""
    from .test_precision import _model, _plan, _run, _tokens
    from planlang.runtime.apply import apply
    monkeypatch.setattr(bw, "device_capability", lambda device: (10, 0))
    monkeypatch.setattr(bw, "_scaled_mm", ref_scaled_mm)
    rule = {"at": "**:linear", "dtype": dtype, "activations": "per_block"}
    ids = _tokens(3)
    want = _run(apply(_model(), _plan([dict(rule, emulate=True)])), ids)
    planned = apply(_model(), _plan([rule]))
    gemms = planned.report.precision
    assert {gemms[p]["kernel"] for p in ("layers.0.attn.wq", "layers.0.mlp.w1", "layers.1.mlp.w2")} == \
        {bw.KERNELS[dtype]}
    assert rel(_run(planned, ids), want) < 1e-4


# ----------------------------------------------------------------------------- the hardware
def _sm100() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= bw.MIN_CAPABILITY


@pytest.mark.gpu
@pytest.mark.skipif(not _sm100(), reason="needs sm_100+ (Blackwell); the lent GPU is an H100")
@pytest.mark.parametrize("dtype", FORMATS)
def test_scaled_mm_on_blackwell_computes_the_emulation(dtype):
    """The real torch._scaled_mm against the FP32 emulation. It needs a Blackwell GPU; the
    only GPU planlang is lent is an H100 (sm_90), so this test has never run."""
    x = sample((70, 256), 7, 0, 4).to(torch.bfloat16).cuda()
    w = sample((128, 256), 8, -3, 4).cuda()
    op = bw.prepare_block_weight(w, dtype)
    got = bw.block_scaled_linear(x, op.data, op.scale, op.tensor_scale, None, dtype, None)
    want = emulated_linear(x, fm.fake_quantize(w, dtype), None, dtype, "per_block", 0, None)
    assert rel(got, want) < 1e-2
