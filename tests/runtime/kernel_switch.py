"""Which implementation of the fused kernels the CPU tests run."""
import contextlib
import os


@contextlib.contextmanager
def kernels(reference: bool):
    """Run the kernels' PyTorch reference instead of Triton (on the CPU, Triton runs only
    under the interpreter, switched off here) while the block runs."""
    saved = os.environ.get("TRITON_INTERPRET")
    if reference:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
