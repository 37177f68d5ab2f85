"""Test setup: Triton's interpreter on machines without a GPU, and the `gpu` marker.

TRITON_INTERPRET must be set before any kernel module defines its `@triton.jit` functions,
so it is set here, at collection time, before the tests import the runtime.
"""
import os
import shutil

import pytest


def _cuda() -> bool:
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _define_kernels() -> None:
    """Import every kernel module now, while TRITON_INTERPRET=1: `@triton.jit` reads it when
    a module defines its kernels, and a test that unsets it for a while (to run the PyTorch
    references) must not be the first to import one, or that module's kernels would need a
    GPU driver for the rest of the run, whatever order or subset of tests runs."""
    try:
        import importlib
        import pkgutil

        import planlang.runtime.kernels as kernels
    except Exception:  # no torch/triton here: the runtime tests skip or fail on their own
        return
    for mod in pkgutil.iter_modules(kernels.__path__):
        try:
            importlib.import_module(f"{kernels.__name__}.{mod.name}")
        except Exception:
            pass


HAS_CUDA = _cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        _define_kernels()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
