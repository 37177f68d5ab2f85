"""Which implementation of a fused kernel runs on a given tensor: Triton or the reference.

Triton runs on CUDA devices, and on the CPU only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before the kernels are imported), which is how CI tests every
kernel without a GPU. Everywhere else the plain-PyTorch reference runs and the report says so.

Programmatic Dependent Launch (PDL, Hopper sm_90 and newer): `pdl_launch(device)` gives the
launch arguments of a kernel that takes part. Such a kernel has a `USE_PDL` constexpr and,
when it is set, calls `gdc_wait()` before it reads anything an earlier kernel wrote and before
its first store or atomic (so it never overwrites what the kernel before still reads), then
`gdc_launch_dependents()`; it may load constant data (weights) before the wait, so the
weight stream overlaps the previous kernel's tail and the launch latency is hidden. Every
program calls the wait (no early return before it): a kernel's completion then implies the
completion of every kernel before it, whatever its neighbours are. Kernels without PDL (cuBLAS,
torch's own) are launched as usual and order the stream fully.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, "triton " + getattr(__import__("triton"), "__version__", "?")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels can run for tensors on `device`, and why not if not."""
    device = torch.device(device)
    ok, why = triton_importable()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, why
    if device.type == "cpu" and interpreter_on():
        return True, why + " (interpreter)"
    return False, f"no Triton backend for device {device.type!r} (set TRITON_INTERPRET=1 to interpret on the CPU)"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor sits where Triton can run (all on one device)."""
    if not tensors:
        return False
    return triton_available(tensors[0].device)[0]


# PLANLANG_PDL=1 turns PDL on (where the device and Triton support it), 0 off; unset: the
# default below. On, as measured on an H100 (torch 2.11+cu130, triton 3.6, 2026-12-08):
# benchmarks/bench_variants.py, both settings alive in one process, 5 interleaved rounds,
# spread under 0.6%: llama-1b decode, FP8 plan batch 1 0.801 -> 0.750 ms (0.937x), tuned
# bf16 plan batch 1 1.087 -> 1.044 ms (0.960x), batch 16 1.378 -> 1.344 ms (0.976x), outputs
# bit-identical. (Earlier single-run A/Bs, one plan after the other, were within noise.)
# Prefetching each GEMV's whole weight slice into L2 before the wait (prefetch.global.L2)
# was slower in the same run: 1.07x (FP8) and 1.10x (bf16) at batch 1.
PDL_ENV = "PLANLANG_PDL"
PDL_DEFAULT = True
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def env_switch(name: str, default: bool, default_means: str) -> bool:
    """An on/off environment variable (1 / on / true / yes, 0 / off / false / no; unset:
    `default`); any other value is a ValueError naming it, with `default_means` in the hint."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    if raw:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected 0 or 1; "
                         f"hint: unset it for the default ({default_means})")
    return default


# A plan's `graphs.pdl` while its model is applied and run (`pdl_mode`): True (on), False
# (off) or None (auto: the default above).
_PLAN_PDL: contextvars.ContextVar = contextvars.ContextVar("planlang_plan_pdl", default=None)


@contextlib.contextmanager
def pdl_mode(mode: str | None):
    """Kernels launched inside follow a plan's `graphs.pdl`: "on" / "off" turn PDL on or off
    (on only where the device supports it: `apply` refuses `on` elsewhere), "auto" or None
    keep the default. PLANLANG_PDL, when set, overrides the plan (for A/B runs)."""
    token = _PLAN_PDL.set({"on": True, "off": False}.get(mode or "auto"))
    try:
        yield
    finally:
        _PLAN_PDL.reset(token)


def _pdl_setting() -> bool:
    plan = _PLAN_PDL.get()
    default = PDL_DEFAULT if plan is None else plan
    return env_switch(PDL_ENV, default, f"{'on' if default else 'off'} on sm_90+")


@functools.lru_cache(maxsize=None)
def _pdl_support(index: int) -> tuple[bool, str]:
    ok, why = triton_importable()
    if not ok:
        return False, why
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception as exc:
        return False, f"this triton has no grid dependency control ({type(exc).__name__}: {exc})"
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False, "this triton cannot launch kernels with PDL (no launch_pdl option)"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return False, f"PDL needs sm_90 or newer; cuda:{index} is sm_{major}{minor}"
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 3):  # CUDA graphs keep programmatic edges from 12.3 on
        return False, f"PDL inside CUDA graphs needs CUDA 12.3+; torch is built for {torch.version.cuda}"
    return True, f"PDL on (sm_{major}{minor}, {why})"


def pdl_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` can launch kernels with PDL at all (whatever the settings), and why
    (not): a CUDA device of sm_90+, a Triton with grid dependency control, CUDA 12.3+."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"PDL needs a CUDA device, not {device.type!r}"
    if interpreter_on():
        return False, "Triton's interpreter runs the kernels"
    return _pdl_support(device.index if device.index is not None else torch.cuda.current_device())


def pdl_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether kernels on `device` launch with PDL, and why (not). Raises ValueError for a
    PLANLANG_PDL value other than 0 / 1 (or off / on, false / true, no / yes)."""
    wanted = _pdl_setting()
    device = torch.device(device)
    if device.type != "cuda" or interpreter_on():
        return pdl_support(device)
    if not wanted:
        if os.environ.get(PDL_ENV, "").strip():
            return False, f"PDL is off ({PDL_ENV}={os.environ[PDL_ENV]})"
        return (False, "PDL is off (the plan's graphs.pdl: off)") if _PLAN_PDL.get() is False \
            else (False, f"PDL is off by default ({PDL_ENV}=1 turns it on)")
    return pdl_support(device)


def pdl_enabled(device: torch.device | str) -> bool:
    """True when kernels on `device` launch with Programmatic Dependent Launch: a CUDA device
    of sm_90+, a Triton with grid dependency control and the `launch_pdl` option, not the
    interpreter, and not turned off by PLANLANG_PDL=0."""
    return pdl_status(device)[0]


def pdl_launch(device: torch.device | str) -> dict:
    """Launch arguments of a kernel with a `USE_PDL` constexpr: `USE_PDL` and, when on,
    Triton's `launch_pdl=True` (left out otherwise, so older Triton versions never see it)."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@functools.lru_cache(maxsize=None)
def gdc_functions():
    """(gdc_wait, gdc_launch_dependents) for use inside kernels: Triton's grid dependency
    control, or no-op jit functions where this Triton has none (kernels call them only under
    `USE_PDL`, which `pdl_launch` never sets there)."""
    import triton
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        return gdc_wait, gdc_launch_dependents
    except Exception:
        @triton.jit
        def _no_wait():
            pass

        @triton.jit
        def _no_launch():
            pass
        return _no_wait, _no_launch


def register_op(name: str, fn, fake, mutates_args=()):
    """The torch.library custom op `planlang::<name>` over `fn`, with `fake` for shapes. A
    module imported under a second name finds the op already there and reuses it."""
    if hasattr(torch.ops.planlang, name):
        return getattr(torch.ops.planlang, name).default
    op = torch.library.custom_op(f"planlang::{name}", fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op
