"""Which implementation of a fused kernel runs on a given tensor: Triton or the reference.

Triton runs on CUDA devices, and on the CPU only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before the kernels are imported), which is how CI tests every
kernel without a GPU. Everywhere else the plain-PyTorch reference runs and the report says so.
"""
from __future__ import annotations

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


def register_op(name: str, fn, fake, mutates_args=()):
    """The torch.library custom op `planlang::<name>` over `fn`, with `fake` for shapes. A
    module imported under a second name finds the op already there and reuses it."""
    if hasattr(torch.ops.planlang, name):
        return getattr(torch.ops.planlang, name).default
    op = torch.library.custom_op(f"planlang::{name}", fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op
