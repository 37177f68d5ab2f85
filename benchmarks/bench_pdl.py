"""Programmatic Dependent Launch (PDL) on and off: chains of decode kernels in one CUDA graph.

    python benchmarks/bench_pdl.py [--layers 16] [--out pdl.json]

At batch 1 a decode step is ~145 small kernels, each paying a launch and a pipeline fill
and drain. With PDL (sm_90+) a kernel launches while the one before still runs, loads its
weights, and waits (`gdc_wait`) only before it reads what that kernel wrote. Every chain
below is captured twice in a CUDA graph, with PLANLANG_PDL=0 and =1, on the same buffers:

  - decode layers: per layer rmsnorm+residual, QKV GEMV, O GEMV, rmsnorm+residual, fused
    gate/up GEMV (SiLU * up), down GEMV, i.e. Llama-3.2-1B's decode sequence without rope and
    attention (other kernels); "+torch op" puts one plain torch kernel (not PDL) between QKV
    and O where the model has rope and attention, as the planned model has;
  - one kernel kind repeated `--layers` times over the layers' weights (each reads its weight
    from HBM: 16 layers are far more than the 50 MB L2), to give the time per kernel;
  - rmsnorm of one row, 96 times: the launch and latency floor of a 1-program kernel.
bf16 weights use planlang's GEMVs (qkv.linear, swiglu.swiglu_linear); fp8 weights (e4m3, a
scale per output channel) `fp8_linear`, as the fp8_weight_only plan runs them.

Per chain: time per replay (CUDA events around 10 replays, median of 15), the floor (the
bytes the chain reads over the device-to-device copy bandwidth measured in the same run),
the time above the floor per kernel, and whether the PDL graph's outputs equal the other's
bit for bit (the kernels are deterministic). The last line is the headline: the decode
layers, PDL on over off. Whether PDL is on by default (backend.PDL_DEFAULT) is decided by
the whole model instead: `planlang bench ... --batch 1 --batch 16` with PLANLANG_PDL=1 and =0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from planlang.runtime.bench import copy_bandwidth_gbs, graph_time_us
from planlang.runtime.kernels import fp8_linear as fp8
from planlang.runtime.kernels import qkv as qkv_mod
from planlang.runtime.kernels import rmsnorm_residual as norm_mod
from planlang.runtime.kernels import swiglu as swiglu_mod
from planlang.runtime.kernels.backend import PDL_ENV, pdl_status
from planlang.runtime.precision.formats import quantize_fp8

D, F, Q, KV = 2048, 8192, 2048, 512  # Llama-3.2-1B: hidden, FFN, q and k/v widths
EPS = 1e-5


class Layer:
    """One layer's decode weights: bf16 and fp8 (channel scales), fused as the plan fuses them."""

    def __init__(self, gen: torch.Generator, device):
        def w(n, k):
            return (torch.randn(n, k, device=device, generator=gen) * k ** -0.5).to(torch.bfloat16)
        self.n1 = 1 + 0.1 * torch.randn(D, device=device, generator=gen).to(torch.bfloat16)
        self.n2 = 1 + 0.1 * torch.randn(D, device=device, generator=gen).to(torch.bfloat16)
        self.qkv, self.o, self.w13, self.down = w(Q + 2 * KV, D), w(D, Q), w(2 * F, D), w(D, F)
        self.fp8 = {}
        for name in ("qkv", "o", "w13", "down"):
            qt = quantize_fp8(getattr(self, name).float(), "fp8_e4m3", "channel")
            self.fp8[name] = (qt.data, qt.scale.float().reshape(-1).contiguous())

    def bytes(self, name: str, fp8_weights: bool) -> int:
        if fp8_weights:
            data, scale = self.fp8[name]
            return data.numel() + scale.numel() * 4
        return getattr(self, name).numel() * 2


def gemv(layer: Layer, name: str, x: torch.Tensor, fp8_weights: bool) -> torch.Tensor:
    if fp8_weights:
        data, scale = layer.fp8[name]
        return fp8.fp8_linear(x, data, scale, act="silu" if name == "w13" else None)
    if name == "w13":
        return swiglu_mod.swiglu_linear(x, layer.w13, "silu")
    return qkv_mod.linear(x, getattr(layer, name))


def decode_layers(layers, x, r, fp8_weights: bool, torch_op: bool):
    """The decode sequence over `layers`; returns its outputs and its kernel count (torch op
    included) and bytes read."""
    outs, kernels, nbytes = [], 0, 0
    for lay in layers:
        s, h = norm_mod.rmsnorm_residual(x, r, lay.n1, EPS)
        qkv = gemv(lay, "qkv", h, fp8_weights)
        q = qkv[..., :Q]
        if torch_op:  # stands where rope and attention run in the model: a kernel without PDL
            q = q * 1.0
        o = gemv(lay, "o", q, fp8_weights)
        s2, h2 = norm_mod.rmsnorm_residual(o, s, lay.n2, EPS)
        g = gemv(lay, "w13", h2, fp8_weights)
        x, r = gemv(lay, "down", g, fp8_weights), s2
        outs += [qkv, o, s2, g, x]
        kernels += 6 + int(torch_op)
        nbytes += sum(lay.bytes(n, fp8_weights) for n in ("qkv", "o", "w13", "down")) + 2 * D * 2
    return outs, kernels, nbytes


def repeated(layers, kind: str, x: torch.Tensor, fp8_weights: bool, times: int):
    """One kernel kind `times` times (cycling through the layers' weights), on the same input
    x (its width fits the kind). Each kernel still waits for the one before (gdc_wait)."""
    outs, nbytes = [], 0
    for i in range(times):
        lay = layers[i % len(layers)]
        if kind == "rmsnorm":
            outs += list(norm_mod.rmsnorm_residual(x, x, lay.n1, EPS))
            nbytes += 5 * D * 2
        else:
            outs.append(gemv(lay, kind, x, fp8_weights))
            nbytes += lay.bytes(kind, fp8_weights)
    return outs, times, nbytes


def capture(fn, pdl: bool):
    """(us per replay, outputs) of fn captured in a CUDA graph with PDL on or off: median of
    15 samples of 10 back-to-back replays each, after fn once eagerly and 3 warm-up replays."""
    os.environ[PDL_ENV] = "1" if pdl else "0"  # the kernels read it at launch: the capture records it
    outs = []
    us = graph_time_us([fn], reps=15, inner=10, warmup=3, eager_first=1, outputs=outs)
    return us, [o.clone() for o in outs[0]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_pdl: needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    os.environ[PDL_ENV] = "1"
    on, why = pdl_status(dev)
    import triton
    props = torch.cuda.get_device_properties(dev)
    bw = copy_bandwidth_gbs(dev)
    print(f"{props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}, {platform.python_version()}; copy bandwidth {bw:.0f} GB/s; {why}")
    if not on:
        print("PDL cannot run here: nothing to compare")
        return 2
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = [Layer(gen, dev) for _ in range(args.layers)]
    x = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
    r = torch.randn(1, D, device=dev, generator=gen).to(torch.bfloat16)
    x_down = torch.randn(1, F, device=dev, generator=gen).to(torch.bfloat16)

    chains = []
    for f8 in (False, True):
        tag = "fp8" if f8 else "bf16"
        chains.append((f"{tag} decode, {args.layers} layers", lambda f8=f8: decode_layers(layers, x, r, f8, False)))
        chains.append((f"{tag} decode, {args.layers} layers +torch op",
                       lambda f8=f8: decode_layers(layers, x, r, f8, True)))
        for kind in ("qkv", "o", "w13", "down"):
            xin = x_down if kind == "down" else x
            chains.append((f"{tag} {kind} GEMV x{args.layers}",
                           lambda kind=kind, xin=xin, f8=f8: repeated(layers, kind, xin, f8, args.layers)))
    chains.append(("rmsnorm+residual 1x2048 x96", lambda: repeated(layers, "rmsnorm", x, False, 96)))

    rows = []
    head = f"{'chain':<36} {'kernels':>7} {'MB':>7} {'floor us':>8} {'off us':>8} {'on us':>8} {'on/off':>6} " \
           f"{'off over/k':>10} {'on over/k':>9} {'same':>5}"
    print(head)
    print("-" * len(head))
    for name, fn in chains:
        results = {}
        for pdl in (False, True):
            us, snap = capture(lambda: fn()[0], pdl)
            results[pdl] = (us, snap)
        _, kernels, nbytes = fn()
        torch.cuda.synchronize()
        floor = nbytes / (bw * 1e9) * 1e6
        off, on_us = results[False][0], results[True][0]
        same = all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))
        row = {"chain": name, "kernels": kernels, "bytes": nbytes, "floor_us": floor, "off_us": off, "on_us": on_us,
               "speedup": off / on_us, "off_over_per_kernel_us": (off - floor) / kernels,
               "on_over_per_kernel_us": (on_us - floor) / kernels, "identical": same}
        rows.append(row)
        print(f"{name:<36} {kernels:>7} {nbytes / 1e6:>7.1f} {floor:>8.1f} {off:>8.1f} {on_us:>8.1f} "
              f"{on_us / off:>6.3f} {row['off_over_per_kernel_us']:>10.2f} {row['on_over_per_kernel_us']:>9.2f} "
              f"{'yes' if same else 'NO':>5}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                       "copy_bandwidth_gbs": bw, "rows": rows}, fh, indent=2)
    dec = {r_["chain"]: r_ for r_ in rows}
    b16, f8r = dec[f"bf16 decode, {args.layers} layers"], dec[f"fp8 decode, {args.layers} layers"]
    print(f"headline: decode layers with PDL: bf16 {b16['off_us']:.0f} -> {b16['on_us']:.0f} us "
          f"({b16['speedup']:.3f}x), fp8 {f8r['off_us']:.0f} -> {f8r['on_us']:.0f} us ({f8r['speedup']:.3f}x)")
    return 0 if all(r_["identical"] for r_ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
