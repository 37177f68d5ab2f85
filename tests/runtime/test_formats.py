"""Quantize / dequantize of fp8_e4m3, fp8_e5m2, mxfp8, mxfp4 and nvfp4, bit for bit.

The reference below is written from the format definitions, in plain Python, without the
module's code path: every value of E2M1, E4M3, E5M2 and E8M0 is enumerated from its
sign / exponent / mantissa / bias rules; rounding searches that table for the two nearest
values and breaks a tie (decided exactly, with fractions) towards the even mantissa;
saturation takes the largest finite value; each float32 step of a scale rule is a float64
operation rounded to float32 through `struct` (exact: float64 carries more than 2*24+2
bits, so the double rounding is innocuous). Module outputs must equal it bit for bit:
element codes, scale codes or values, and dequantized values (compared as int32 bits, so
-0 differs from +0).
"""
from __future__ import annotations

import bisect
import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planlang.runtime.precision import formats as fm

gpu = pytest.mark.gpu
FP8_NAMES = ("fp8_e4m3", "fp8_e5m2")
FP8_SCALINGS = ("tensor", "channel", "block", "per_tensor", "per_token", "per_block")
SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ the reference
@dataclass(frozen=True)
class Minifloat:
    """A sign/exponent/mantissa format. specials: "ieee" (all-ones exponent: inf, NaN),
    "fn" (only all-ones exponent and mantissa is NaN, no inf), "none" (every code finite)."""
    ebits: int
    mbits: int
    bias: int
    specials: str

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    def value(self, code: int) -> float:
        sign = -1.0 if code & self.sign_bit else 1.0
        e = (code >> self.mbits) & ((1 << self.ebits) - 1)
        m = code & ((1 << self.mbits) - 1)
        top = (1 << self.ebits) - 1
        if self.specials == "ieee" and e == top:
            return sign * math.inf if m == 0 else math.nan
        if self.specials == "fn" and e == top and m == (1 << self.mbits) - 1:
            return math.nan
        if e == 0:  # subnormal: 0.m * 2^(1 - bias)
            return sign * (m / (1 << self.mbits)) * 2.0 ** (1 - self.bias)
        return sign * (1 + m / (1 << self.mbits)) * 2.0 ** (e - self.bias)

    def codes(self) -> range:
        return range(1 << (1 + self.ebits + self.mbits))


E4M3 = Minifloat(4, 3, 7, "fn")
E5M2 = Minifloat(5, 2, 15, "ieee")
E2M1 = Minifloat(2, 1, 1, "none")
ELEMENT = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2, "mxfp8": E4M3, "mxfp4": E2M1, "nvfp4": E2M1}


def e8m0_value(code: int) -> float:
    """E8M0: an exponent only, bias 127; 255 is NaN."""
    return math.nan if code == 255 else 2.0 ** (code - 127)


class Rounder:
    """Round to nearest, ties to even mantissa, saturating, by searching the value table."""

    def __init__(self, fmt: Minifloat):
        self.fmt = fmt
        pos = sorted((fmt.value(c), c) for c in fmt.codes()
                     if not c & fmt.sign_bit and math.isfinite(fmt.value(c)))
        self.values = [v for v, _ in pos]
        self.pos_codes = [c for _, c in pos]
        self.max = self.values[-1]

    def bracket(self, a: float) -> int:
        """Index i with values[i] <= a < values[i + 1] (a finite, 0 <= a < max)."""
        return bisect.bisect_right(self.values, a) - 1

    def code(self, x: float) -> int:
        sign = self.fmt.sign_bit if math.copysign(1.0, x) < 0 else 0
        a = abs(x)
        if a >= self.max:
            return self.pos_codes[-1] | sign
        i = self.bracket(a)
        lo, hi = self.values[i], self.values[i + 1]
        d_lo, d_hi = Fraction(a) - Fraction(lo), Fraction(hi) - Fraction(a)
        if d_lo < d_hi:
            c = self.pos_codes[i]
        elif d_hi < d_lo:
            c = self.pos_codes[i + 1]
        else:  # a tie: the even mantissa
            c = self.pos_codes[i] if self.pos_codes[i] % 2 == 0 else self.pos_codes[i + 1]
        return c | sign

    def gap(self, a: float) -> float:
        """The distance between the two values around |a| (its ULP), |a| < max."""
        i = self.bracket(abs(a))
        return self.values[i + 1] - self.values[i]


ROUND = {"e4m3": Rounder(E4M3), "e5m2": Rounder(E5M2), "e2m1": Rounder(E2M1)}
ROUNDER = {"fp8_e4m3": ROUND["e4m3"], "fp8_e5m2": ROUND["e5m2"], "mxfp8": ROUND["e4m3"],
           "mxfp4": ROUND["e2m1"], "nvfp4": ROUND["e2m1"]}
SMALLEST_F32 = 2.0 ** -149


def f32(x: float) -> float:
    """x rounded to float32 (to nearest even)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def bits32(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def chunks(row: list, size: int) -> list:
    return [row[i:i + size] for i in range(0, len(row), size)]


def ref_fp8(rows: list[list[float]], name: str, scaling: str, block: int):
    """FP8: scale = amax / fmax (1 for amax 0, at least 2^-149); code = RNE(x / scale)."""
    rnd = ROUNDER[name]

    def scale_of(vals):
        amax = max(abs(v) for v in vals)
        return max(1.0 if amax == 0 else f32(amax / rnd.max), SMALLEST_F32)

    def group_of(r, j):  # (index into the flat scale list) of element j of row r
        if scaling in ("tensor", "per_tensor"):
            return 0
        if scaling in ("channel", "per_token"):
            return r
        return r * nb + j // block

    k = len(rows[0])
    nb = -(-k // block)
    if scaling in ("tensor", "per_tensor"):
        scales = [scale_of([v for row in rows for v in row])]
    elif scaling in ("channel", "per_token"):
        scales = [scale_of(row) for row in rows]
    else:
        scales = [scale_of(c) for row in rows for c in chunks(row, block)]
    codes, deq, per_element = [], [], []
    for r, row in enumerate(rows):
        for j, v in enumerate(row):
            s = scales[group_of(r, j)]
            c = rnd.code(max(-rnd.max, min(rnd.max, f32(v / s))))
            codes.append(c)
            deq.append(f32(rnd.fmt.value(c) * s))
            per_element.append(s)
    return codes, scales, deq, per_element


def ref_mx(rows: list[list[float]], name: str, block: int = 32):
    """OCP MX v1.0: X = 2^(floor(log2(amax)) - emax_elem), E8M0; elements RNE(x / X), saturating."""
    rnd = ROUNDER[name]
    emax = {"mxfp8": 8, "mxfp4": 2}[name]
    codes, scales, deq = [], [], []
    for row in rows:
        for blk in chunks(row, block):
            if not all(math.isfinite(v) for v in blk):
                scales.append(255)
                codes += [0] * len(blk)
                deq += [math.nan] * len(blk)
                continue
            amax = max(abs(v) for v in blk)
            shared = -127 if amax == 0 else math.frexp(amax)[1] - 1 - emax  # frexp: amax = m 2^e, m in [0.5, 1)
            shared = max(-127, min(127, shared))
            scales.append(shared + 127)
            x_scale = e8m0_value(shared + 127)
            for v in blk:
                c = rnd.code(v / x_scale)  # exact: a power of two, float64 range
                codes.append(c)
                deq.append(f32(rnd.fmt.value(c) * x_scale))
    return codes, scales, deq


def ref_nvfp4(rows: list[list[float]]):
    """NVFP4: s_t = amax / (6 * 448); block scale E4M3((bamax / 6) / s_t), at least 2^-9 for a
    non-zero block; elements RNE(x / (block scale * s_t)) in E2M1."""
    e2m1, e4m3 = ROUND["e2m1"], ROUND["e4m3"]
    amax = max(abs(v) for row in rows for v in row)
    s_t = max(1.0 if amax == 0 else f32(amax / f32(6.0 * 448.0)), SMALLEST_F32)
    codes, scales, deq = [], [], []
    for row in rows:
        for blk in chunks(row, 16):
            bamax = max(abs(v) for v in blk)
            sc = e4m3.code(min(448.0, f32(f32(bamax / 6.0) / s_t)))
            if E4M3.value(sc) == 0 and bamax > 0:
                sc = 0x01  # the smallest E4M3 subnormal, 2^-9
            scales.append(sc)
            denom = f32(E4M3.value(sc) * s_t)
            for v in blk:
                c = e2m1.code(f32(v / denom) if denom > 0 else v * 0.0)
                codes.append(c)
                deq.append(f32(E2M1.value(c) * denom))
    return codes, scales, deq, s_t


def ref_pack(codes_rows: list[list[int]]) -> list[int]:
    out = []
    for row in codes_rows:
        row = row + [0] * (len(row) % 2)
        out += [row[i] | (row[i + 1] << 4) for i in range(0, len(row), 2)]
    return out


# ============================================================================ helpers
def rows_of(x: torch.Tensor) -> list[list[float]]:
    return x.float().reshape(-1, x.shape[-1]).tolist()


def flat(t: torch.Tensor) -> list:
    return t.reshape(-1).tolist()


def assert_same_bits(actual: torch.Tensor, expected: list[float]):
    """float32 values equal bit for bit (NaN: any NaN)."""
    got = flat(actual.float())
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        if math.isnan(e):
            assert math.isnan(a), (i, a, e)
        else:
            assert bits32(a) == bits32(e), (i, a, e)


def sample(shape, seed: int, exponent: int, spread: int) -> torch.Tensor:
    """Fresh random float32 values: randn * 2^exponent, each element also scaled by
    2^U(-spread, spread), so one tensor spans several magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-spread, spread + 1, shape, generator=g).double()) * 2.0 ** exponent
    return x.float()


shapes = st.tuples(st.integers(1, 5), st.integers(1, 150))
magnitudes = st.tuples(st.integers(0, 2 ** 31 - 1), st.integers(-135, 100), st.sampled_from([0, 4, 16]))
f32_values = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=70)


def check_fp8(x: torch.Tensor, name: str, scaling: str, block: int):
    if scaling in ("per_tensor", "per_token", "per_block"):
        q = fm.quantize_activation_fp8(x, name, scaling, block)
    else:
        q = fm.quantize_fp8(x, name, scaling, block)
    codes, scales, deq, _ = ref_fp8(rows_of(x), name, scaling, block)
    assert q.data.dtype == fm.fp8_dtype(name) and q.data.shape == x.shape
    assert q.scale.dtype == torch.float32
    assert flat(q.data.view(torch.uint8)) == codes
    assert_same_bits(q.scale, scales)
    assert_same_bits(fm.dequantize(q), deq)
    return q


# ============================================================================ the tables
def test_reference_tables_are_the_formats_of_the_spec():
    assert ROUND["e2m1"].values == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert ROUND["e4m3"].max == 448.0 and ROUND["e4m3"].values[1] == 2.0 ** -9
    assert ROUND["e5m2"].max == 57344.0 and ROUND["e5m2"].values[1] == 2.0 ** -16
    assert sum(math.isnan(E4M3.value(c)) for c in E4M3.codes()) == 2  # 0x7F and 0xFF
    assert fm.format_max("fp8_e4m3") == 448.0 and fm.format_max("fp8_e5m2") == 57344.0
    assert fm.format_max("mxfp8") == 448.0 and fm.format_max("mxfp4") == fm.format_max("nvfp4") == 6.0
    assert fm.fp8_dtype("fp8_e4m3") is torch.float8_e4m3fn and fm.fp8_dtype("fp8_e5m2") is torch.float8_e5m2


@pytest.mark.parametrize("name,fmt", [("fp8_e4m3", E4M3), ("fp8_e5m2", E5M2)])
def test_every_fp8_code_agrees_with_torchs_float8_type(name, fmt):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert_same_bits(codes.view(fm.fp8_dtype(name)).float(), [fmt.value(c) for c in range(256)])


def test_every_e8m0_code_decodes_to_its_power_of_two():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert_same_bits(fm.decode_e8m0(codes), [e8m0_value(c) for c in range(256)])
    if hasattr(torch, "float8_e8m0fnu"):
        assert_same_bits(codes.view(torch.float8_e8m0fnu).float(), [e8m0_value(c) for c in range(256)])


def test_every_e2m1_code_decodes_packs_and_unpacks():
    codes = list(range(16))
    t = torch.tensor(codes, dtype=torch.uint8)
    assert_same_bits(fm.decode_e2m1(t), [E2M1.value(c) for c in codes])
    assert flat(fm.encode_e2m1(fm.decode_e2m1(t))) == codes  # each value, -0 included, is its own code
    for row in (codes, codes[:15], codes[::-1] + codes[:3]):  # even and odd lengths
        r = torch.tensor([row], dtype=torch.uint8)
        packed = fm.pack_fp4(r)
        assert packed.shape == (1, (len(row) + 1) // 2)
        assert flat(packed) == ref_pack([row])
        assert flat(fm.unpack_fp4(packed, len(row))) == row


@SETTINGS
@given(f32_values)
def test_encode_e2m1_rounds_to_nearest_even_and_saturates(values):
    x = torch.tensor(values, dtype=torch.float32)
    assert flat(fm.encode_e2m1(x)) == [ROUND["e2m1"].code(v) for v in rows_of(x)[0]]


def test_encode_e2m1_breaks_every_tie_towards_the_even_mantissa():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # written by hand from the table
    x = torch.tensor(ties + [-t for t in ties] + [6.5, 1e30, -7.0])
    assert fm.decode_e2m1(fm.encode_e2m1(x)).tolist() == want + [-w for w in want] + [6.0, 6.0, -6.0]


# ============================================================================ FP8
@SETTINGS
@given(name=st.sampled_from(FP8_NAMES), scaling=st.sampled_from(FP8_SCALINGS), shape=shapes,
       block=st.sampled_from([1, 16, 32, 128]), mag=magnitudes)
def test_fp8_quantization_matches_the_reference(name, scaling, shape, block, mag):
    check_fp8(sample(shape, *mag), name, scaling, block)


@SETTINGS
@given(name=st.sampled_from(FP8_NAMES), scaling=st.sampled_from(FP8_SCALINGS), values=f32_values,
       rows=st.integers(1, 3), block=st.sampled_from([1, 8, 128]))
def test_fp8_quantization_of_any_float32_values_matches_the_reference(name, scaling, values, rows, block):
    x = torch.tensor(values * rows, dtype=torch.float32).reshape(rows, -1)  # huge, tiny, subnormal, ±0
    q = check_fp8(x, name, scaling, block)
    assert torch.isfinite(fm.dequantize(q)).all()


@SETTINGS
@given(name=st.sampled_from(FP8_NAMES), scaling=st.sampled_from(["tensor", "channel", "block"]), shape=shapes,
       mag=magnitudes)
def test_fp8_dequantize_is_within_half_an_ulp_of_the_scaled_value(name, scaling, shape, mag):
    x = sample(shape, *mag)
    q = fm.quantize_fp8(x, name, scaling, 32)
    rnd = ROUNDER[name]
    _, scales, _, per_element = ref_fp8(rows_of(x), name, scaling, 32)
    assert flat(q.scale) == scales
    for v, c, s in zip(flat(x), flat(q.data.view(torch.uint8)), per_element):
        y = f32(v / s)
        if s >= 2.0 ** -126:  # a normal scale: amax / scale is fmax to within rounding
            assert abs(y) <= rnd.max * (1 + 2 ** -23)
        if abs(y) < rnd.max:
            assert abs(Fraction(rnd.fmt.value(c)) - Fraction(y)) <= Fraction(rnd.gap(y)) / 2
        else:  # a subnormal scale is coarse: the amax may land past fmax, and saturates
            assert rnd.fmt.value(c) == math.copysign(rnd.max, y)


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_ties_round_to_even(name):
    rnd = ROUNDER[name]
    mids = [(a + b) / 2 for a, b in zip(rnd.values, rnd.values[1:])]
    k = 2.0 ** -5  # amax = fmax * k: the scale is exactly k, and mids * k are exact float32
    x = torch.tensor([[rnd.max * k] + [m * k for m in mids] + [-m * k for m in mids]])
    q = check_fp8(x, name, "tensor", 128)
    assert q.scale.tolist() == [k]
    codes = flat(q.data.view(torch.uint8))[1:]
    got = [rnd.fmt.value(c) for c in codes[:len(mids)]]
    for m, v, lo, hi in zip(mids, got, rnd.values, rnd.values[1:]):
        assert v in (lo, hi), (m, v)
    assert all(c % 2 == 0 for c in codes), "a tie went to an odd mantissa"


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_saturates_at_fmax_and_never_gives_inf_or_nan(name):
    fmax = fm.format_max(name)
    x = torch.tensor([[1e6, -1e6, fmax * 1.06, math.inf, -math.inf, 1.0, -0.0]])
    q = fm.quantize_fp8(x, name, "tensor", scale=torch.ones(1))
    assert fm.dequantize(q).tolist() == [[fmax, -fmax, fmax, fmax, -fmax, 1.0, -0.0]]


def test_fp8_all_zero_groups_get_scale_one_and_zero_data():
    x = torch.zeros(3, 70)
    x[1, 40:] = torch.randn(30) + 3.0  # row 1: blocks 0 and 1 of 32 are zero, block 2 is not
    q = check_fp8(x, "fp8_e4m3", "block", 32)
    assert q.scale.shape == (3, 3)
    assert q.scale[0].tolist() == [1.0, 1.0, 1.0] and q.scale[1, 0].item() == 1.0
    assert fm.dequantize(q)[0].abs().max().item() == 0.0
    assert not torch.isnan(fm.dequantize(fm.quantize_fp8(torch.zeros(2, 5), "fp8_e5m2", "tensor"))).any()


def test_fp8_block_scaling_takes_a_partial_last_block_along_the_input_dim():
    w = torch.randn(4, 130) + 0.1
    q = check_fp8(w, "fp8_e4m3", "block", 128)
    assert q.scale.shape == (4, 2) and q.block_size == 128
    assert q.scale[:, 1].tolist() == [f32(max(abs(v) for v in row[128:]) / 448.0) for row in w.tolist()]


def test_fp8_scale_shapes_follow_the_scaling():
    w = torch.randn(6, 300)
    assert fm.quantize_fp8(w, scaling="tensor").scale.shape == (1,)
    assert fm.quantize_fp8(w, scaling="channel").scale.shape == (6,)
    assert fm.quantize_fp8(w, scaling="block").scale.shape == (6, 3)
    x = torch.randn(2, 3, 40)
    assert fm.quantize_activation_fp8(x, mode="per_token").scale.shape == (2, 3)
    assert fm.quantize_activation_fp8(x, mode="per_tensor").scale.shape == (1,)
    assert fm.quantize_activation_fp8(x, mode="per_block", block_size=16).scale.shape == (2, 3, 3)


def test_fp8_tiny_amax_never_gives_a_zero_scale():
    x = torch.tensor([[2.0 ** -149, -2.0 ** -149, 0.0]])  # amax / 448 underflows to 0 in float32
    q = check_fp8(x, "fp8_e4m3", "channel", 128)
    assert q.scale.tolist() == [2.0 ** -149]
    assert fm.dequantize(q).tolist() == x.tolist()


@pytest.mark.parametrize("scaling", ["tensor", "channel", "block"])
def test_fp8_non_finite_input_makes_its_group_nan(scaling):
    x = torch.randn(2, 64)
    x[1, 3] = math.inf
    out = fm.dequantize(fm.quantize_fp8(x, "fp8_e4m3", scaling, 32))
    group = torch.zeros(2, 64, dtype=torch.bool)  # the elements sharing the inf's scale
    everything = slice(None)
    rows, cols = {"tensor": (everything, everything), "channel": (1, everything), "block": (1, slice(0, 32))}[scaling]
    group[rows, cols] = True
    assert torch.equal(torch.isnan(out), group)


# ============================================================================ MX
def check_mx(x: torch.Tensor, name: str):
    q = fm.quantize_mx(x, name)
    codes, scales, deq = ref_mx(rows_of(x), name)
    k = x.shape[-1]
    assert q.scale.dtype == torch.uint8 and q.scale.shape == (*x.shape[:-1], -(-k // 32))
    assert flat(q.scale) == scales
    if name == "mxfp8":
        assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape
        assert flat(q.data.view(torch.uint8)) == codes
    else:
        assert q.data.dtype == torch.uint8 and q.data.shape == (*x.shape[:-1], (k + 1) // 2)
        assert flat(q.data) == ref_pack(chunks(codes, k))
    assert_same_bits(fm.dequantize(q), deq)
    return q


@SETTINGS
@given(name=st.sampled_from(["mxfp8", "mxfp4"]), shape=shapes, mag=magnitudes)
def test_mx_matches_the_reference(name, shape, mag):
    check_mx(sample(shape, *mag), name)


@SETTINGS
@given(name=st.sampled_from(["mxfp8", "mxfp4"]), values=f32_values)
def test_mx_of_any_float32_values_matches_the_reference(name, values):
    check_mx(torch.tensor([values]), name)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("shared", [-127, -20, 0, 9, 119])
def test_mx_ties_round_to_even(name, shared):
    rnd = ROUNDER[name]
    emax = {"mxfp8": 8, "mxfp4": 2}[name]
    mids = [(a + b) / 2 for a, b in zip(rnd.values, rnd.values[1:])]
    signed = [m * sign for m in mids for sign in (1.0, -1.0)]
    top = 1.5 * 2.0 ** emax  # every block's amax lies in [2^emax, 2^(emax+1)): its exponent is `shared`
    row = []
    for i in range(0, len(signed), 31):
        row += [top] + signed[i:i + 31]
    x = torch.tensor([[v * 2.0 ** shared for v in row]], dtype=torch.float32)  # exact in float32
    q = check_mx(x, name)
    assert set(flat(q.scale)) == {shared + 127}
    codes = flat(q.data.view(torch.uint8)) if name == "mxfp8" else flat(fm.unpack_fp4(q.data, len(row)))
    assert all(c % 2 == 0 for i, c in enumerate(codes) if i % 32), "a tie went to an odd mantissa"


def test_mx_hand_written_ties_for_mxfp4():
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0]]) * 2.0 ** -3
    q = fm.quantize_mx(x, "mxfp4")
    assert flat(q.scale) == [127 - 3]
    assert (fm.dequantize(q) * 8).tolist() == [[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]]


def test_mx_saturates_between_the_element_max_and_the_next_power_of_two():
    q8 = fm.quantize_mx(torch.tensor([[3.9, 1.0]]), "mxfp8")  # 3.9 / 2^(1-8) = 499.2 > 448
    assert flat(q8.scale) == [127 - 7] and flat(q8.data.view(torch.uint8))[0] == 0x7E
    q4 = fm.quantize_mx(torch.tensor([[-7.5, 1.0]]), "mxfp4")  # -7.5 / 2^(2-2) < -6
    assert fm.dequantize(q4).tolist() == [[-6.0, 1.0]]


def test_mx_zero_block_gets_the_smallest_scale_and_a_non_finite_block_a_nan_scale():
    x = torch.randn(1, 96)
    x[0, :32] = 0.0
    x[0, 40] = math.nan
    for name in ("mxfp8", "mxfp4"):
        q = check_mx(x, name)
        assert flat(q.scale)[:2] == [0, 255]
        out = fm.dequantize(q)
        assert out[0, :32].abs().max().item() == 0.0
        assert torch.isnan(out[0, 32:64]).all() and torch.isfinite(out[0, 64:]).all()


# ============================================================================ NVFP4
def check_nvfp4(x: torch.Tensor):
    q = fm.quantize_nvfp4(x)
    codes, scales, deq, s_t = ref_nvfp4(rows_of(x))
    k = x.shape[-1]
    assert q.tensor_scale.dtype == torch.float32 and q.tensor_scale.tolist() == [s_t]
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (*x.shape[:-1], -(-k // 16))
    assert flat(q.scale.view(torch.uint8)) == scales
    assert q.data.dtype == torch.uint8 and q.data.shape == (*x.shape[:-1], (k + 1) // 2)
    assert flat(q.data) == ref_pack(chunks(codes, k))
    assert_same_bits(fm.dequantize(q), deq)
    return q


@SETTINGS
@given(shape=shapes, mag=magnitudes)
def test_nvfp4_matches_the_reference(shape, mag):
    check_nvfp4(sample(shape, *mag))


@SETTINGS
@given(values=f32_values, rows=st.integers(1, 3))
def test_nvfp4_of_any_float32_values_matches_the_reference(values, rows):
    check_nvfp4(torch.tensor(values * rows).reshape(rows, -1))


def test_nvfp4_ties_round_to_even():
    # amax = 2688 * 2^-4: s_t = 2^-4 exactly; block 0's scale is 448 (amax / 6 / s_t) and
    # block 1's is 2^3 (amax 6 * 2^3 * s_t): every element below is an exact multiple.
    s_t = 2.0 ** -4
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    b0 = [2688.0 * s_t] + [t * 448 * s_t for t in ties] + [-t * 448 * s_t for t in ties] + [0.0]
    b1 = [6 * 8 * s_t] + [t * 8 * s_t for t in ties] + [-t * 8 * s_t for t in ties] + [-0.0]
    q = check_nvfp4(torch.tensor([b0 + b1]))
    assert fm.decode_e2m1(fm.unpack_fp4(q.data, 32)).tolist()[0][1:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert q.scale.float().tolist() == [[448.0, 8.0]]


def test_nvfp4_tiny_block_is_not_flushed_to_zero_by_its_scale():
    x = torch.randn(1, 32).sign() * (torch.rand(1, 32) + 0.5) * 1e-3
    x[0, 0] = 1e3  # s_t = 1e3 / 2688; block 1's (amax / 6) / s_t < 2^-10 rounds to 0 in E4M3
    q = check_nvfp4(x)
    assert q.scale.float()[0, 1].item() == 2.0 ** -9
    assert fm.dequantize(q)[0, 16:].abs().max().item() > 0


def test_nvfp4_all_zero_tensor_dequantizes_to_zero():
    q = check_nvfp4(torch.zeros(2, 20))
    assert q.tensor_scale.tolist() == [1.0] and fm.dequantize(q).abs().max().item() == 0.0


# ============================================================================ the plan's words
CASES = [("fp8_e4m3", "channel", None), ("fp8_e5m2", "block", 32), ("fp8_e4m3", "per_token", None),
         ("fp8_e4m3", "per_tensor", None), ("fp8_e5m2", "per_block", 16), ("mxfp8", None, None),
         ("mxfp4", "per_block", None), ("nvfp4", "block", 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,scaling,block", CASES)
def test_fake_quantize_is_dequantize_of_quantize_in_the_input_dtype(name, scaling, block, dtype):
    x = (torch.randn(3, 50) * 5).to(dtype)
    out = fm.fake_quantize(x, name, scaling, block)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       fm.dequantize(fm.quantize(x, name, scaling, block)).to(dtype)
                       .view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_quantize_by_the_plans_words_is_the_matching_function():
    x = torch.randn(4, 70)
    same = [(fm.quantize(x, "fp8_e4m3"), fm.quantize_fp8(x, "fp8_e4m3", "channel")),
            (fm.quantize(x, "fp8_e5m2", "block"), fm.quantize_fp8(x, "fp8_e5m2", "block", 128)),
            (fm.quantize(x, "fp8_e4m3", "per_token"), fm.quantize_activation_fp8(x, "fp8_e4m3", "per_token")),
            (fm.quantize(x, "mxfp4"), fm.quantize_mx(x, "mxfp4")),
            (fm.quantize(x, "nvfp4"), fm.quantize_nvfp4(x))]
    for a, b in same:
        assert a.format == b.format and a.scaling == b.scaling and a.block_size == b.block_size
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
        assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
        assert torch.equal(a.dequantize(), fm.dequantize(b))


@pytest.mark.parametrize("call,words", [
    (lambda: fm.quantize(torch.randn(2, 8), "int4"), "not a low-precision dtype"),
    (lambda: fm.quantize(torch.randn(2, 8), "fp8_e4m3", "rows"), "unknown scaling"),
    (lambda: fm.quantize(torch.randn(2, 8), "mxfp8", "channel"), "own blocks"),
    (lambda: fm.quantize(torch.randn(2, 8), "nvfp4", None, 32), "hold 16"),
    (lambda: fm.quantize_fp8(torch.randn(2, 8), "fp8_e4m3", "per_token"), "unknown scaling"),
    (lambda: fm.quantize_fp8(torch.randn(2, 8), "fp8", "channel"), "not an FP8 dtype"),
    (lambda: fm.quantize_fp8(torch.randn(2, 8), "fp8_e4m3", "block", 0), "positive integer"),
    (lambda: fm.quantize_fp8(torch.randn(2, 8), scale=torch.ones(3)), "expected shape (2,)"),
    (lambda: fm.quantize_activation_fp8(torch.randn(2, 8), "fp8_e4m3", "keep"), "not quantized"),
    (lambda: fm.quantize_fp8(torch.ones(2, 8, dtype=torch.int32)), "floating-point"),
    (lambda: fm.quantize_mx(torch.tensor(1.0)), "last (input) dimension"),
    (lambda: fm.quantize_mx(torch.randn(2, 8), "mxfp6"), "unknown MX format"),
    (lambda: fm.pack_fp4(torch.tensor([3, 16], dtype=torch.uint8)), "0..15"),
    (lambda: fm.format_max("bf16"), "unknown low-precision dtype"),
])
def test_bad_input_gets_a_clear_error(call, words):
    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value)


# ============================================================================ CUDA
@gpu
@pytest.mark.parametrize("name,scaling,block", CASES)
def test_cuda_gives_the_same_bits_as_the_cpu(name, scaling, block):
    x = sample((8, 300), 0, 0, 16)
    cpu = fm.quantize(x, name, scaling, block)
    cuda = fm.quantize(x.cuda(), name, scaling, block)
    assert torch.equal(cpu.data.view(torch.uint8), cuda.data.cpu().view(torch.uint8))
    assert torch.equal(cpu.scale.view(torch.uint8), cuda.scale.cpu().view(torch.uint8))
    assert torch.equal(fm.dequantize(cpu).view(torch.int32), fm.dequantize(cuda).cpu().view(torch.int32))
