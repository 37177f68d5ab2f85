"""The language's vocabulary, defined once: everything else (schema, grammar checks,
validation, docs tests) reads these tuples."""
from __future__ import annotations

LANGUAGE_VERSION = 1

FUSION_KINDS = ("rmsnorm_residual", "qkv", "swiglu", "rope_kvcache", "attention", "sampling",
                # planlang extension: every linear no other fusion took -> the per-shape fastest GEMM/GEMV
                "linear")

# Options each fusion kind takes (spec §4). Values are checked in plan.py.
FUSION_OPTIONS = {
    "rmsnorm_residual": ("eps",),
    "qkv": (),
    "swiglu": ("act",),
    "rope_kvcache": (),
    "attention": ("softcap", "sink", "mask"),
    "sampling": ("temperature", "top_k", "top_p"),
    "linear": (),
}
ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTION_MASKS = ("causal", "none")  # or {sliding_window: N}

OP_KINDS = (
    "linear", "matmul", "qk", "pv", "attention", "norm", "softmax", "act",
    "embedding", "lm_head", "kv_cache",
)

MODES = ("inference", "training")
CAPTURE_MODES = ("none", "cuda_graph")
OVER_MAX = ("eager", "error")
PDL_MODES = ("auto", "on", "off")  # graphs.pdl: Programmatic Dependent Launch (sm_90+)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Compile modes in which torch.compile captures CUDA graphs itself.
GRAPH_CAPTURING_COMPILE_MODES = ("reduce-overhead", "max-autotune")

BASE_DTYPES = ("fp32", "tf32", "bf16", "fp16")
FP8_DTYPES = ("fp8_e4m3", "fp8_e5m2")
BLOCK_DTYPES = ("mxfp8", "nvfp4", "mxfp4")  # scale in their own blocks, sm_100+
DTYPES = BASE_DTYPES + FP8_DTYPES + BLOCK_DTYPES
ACCUMULATE_DTYPES = ("fp32", "fp16", "bf16")
SCALINGS = ("tensor", "channel", "block")
ACTIVATION_QUANT = ("keep", "per_token", "per_tensor", "per_block")
FORMAT_BLOCK = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
DEFAULT_BLOCK_SIZE = 128

PRESETS = ("bf16", "fp8_weight_only", "fp8_dynamic", "mxfp8", "nvfp4", "mxfp4")

OFFLOAD_TARGETS = ("cpu",)
RECOMPUTE_POLICIES = ("full", "selective")
PARALLEL_STYLES = ("colwise", "rowwise", "replicate")


def pdl_word(value):
    """A graphs.pdl value as its word: YAML 1.1 reads a bare `on` / `off` as true / false."""
    return ("on" if value else "off") if isinstance(value, bool) else value
