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


HAS_CUDA = _cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
