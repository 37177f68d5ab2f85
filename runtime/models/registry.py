"""The built-in reference models: `builtin:<name>` on the command line.

Each entry is a config factory plus the dtype the model runs in. Weights are random from a
fixed seed, except for entries that name a weights file: a planlang checkpoint under
`runtime/models/data/` (the hook for the `*-trained` models), loaded instead.

`llama-tiny-trained` is such a model: a byte-level Llama trained on Python's standard
library by `python -m planlang.runtime.models.train_tiny`, so that numerics (number formats,
fused kernels) can be judged against a model whose logits mean something; its weights,
training record and held-out evaluation text lie in `data/` (see `data/README.md`).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .llama import ModelConfig, Transformer

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_MODEL = "llama-tiny"
# Below this many parameters, weights are drawn on the CPU and copied over, so a tiny model
# has the same weights on every device; bigger ones are drawn on their device, for speed.
_DRAW_ON_CPU_BELOW = 100_000_000


@dataclass(frozen=True)
class BuiltinModel:
    """One registry entry; calling it returns a fresh `ModelConfig`."""

    make_config: Callable[[], ModelConfig]
    dtype: torch.dtype
    summary: str
    weights: Optional[str] = None  # a planlang checkpoint under DATA_DIR; None: random weights

    def __call__(self) -> ModelConfig:
        return self.make_config()


def _llama_tiny() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256)


def _llama_tiny_trained() -> ModelConfig:
    # Dims are multiples of 32 (head_dim 32, K 256 and 768), so FP8 and block formats apply.
    return ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=256,
                       rope_theta=10000.0, max_seq_len=2048)


def _gemma2_tiny() -> ModelConfig:
    return ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256,
        norm_eps=1e-6, rope_theta=10000.0, act="gelu_tanh", norm_offset=1.0,
        embed_scale=64 ** 0.5, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=8, sliding_window_every=2, arch="gemma2",
    )


def _sinks_tiny() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=256,
                       attn_sinks=True, arch="sinks")


def _llama_1b() -> ModelConfig:
    # Llama-3.2-1B's shape: 1.24B parameters with the tied LM head.
    return ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                       vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True)


def _llama_8b() -> ModelConfig:
    # Llama-3.1-8B's shape: 8.03B parameters, untied LM head.
    return ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "llama-tiny": BuiltinModel(_llama_tiny, torch.float32, "tiny Llama for CPU tests"),
    "gemma2-tiny": BuiltinModel(_gemma2_tiny, torch.float32,
                                "tiny Gemma-2-like: soft-caps, sliding window on even layers, GeGLU"),
    "sinks-tiny": BuiltinModel(_sinks_tiny, torch.float32, "tiny Llama with gpt-oss-style attention sinks"),
    "llama-tiny-trained": BuiltinModel(_llama_tiny_trained, torch.bfloat16,
                                       "byte-level Llama trained on Python's standard library",
                                       weights="llama_tiny_trained.safetensors"),
    "llama-1b": BuiltinModel(_llama_1b, torch.bfloat16, "Llama-3.2-1B shape"),
    "llama-8b": BuiltinModel(_llama_8b, torch.bfloat16, "Llama-3.1-8B shape"),
}


def builtin_names() -> list[str]:
    """The built-in model names, in registry order."""
    return list(BUILTIN_MODELS)


def suggest(name: str) -> Optional[str]:
    """The closest built-in name to `name`, or None when nothing is close."""
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
    return close[0] if close else None


def unknown_name_message(name: str) -> str:
    hint = suggest(name)
    did_you_mean = f"; did you mean {hint!r}?" if hint else ""
    return f"unknown built-in model {name!r}{did_you_mean} (known: {', '.join(BUILTIN_MODELS)})"


def describe(name: str) -> str:
    """One line: the name, its shape, parameter count, dtype and where the weights come from."""
    if name not in BUILTIN_MODELS:
        raise KeyError(unknown_name_message(name))
    entry = BUILTIN_MODELS[name]
    c = entry()
    params = c.num_parameters()
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    dtype = str(entry.dtype).removeprefix("torch.")
    weights = f"weights {entry.weights}" if entry.weights else "random weights"
    return (f"{name}: {entry.summary}; {c.arch}, dim {c.dim}, {c.n_layers} layers, "
            f"{c.n_heads}/{c.n_kv_heads} heads, ffn {c.ffn_dim}, vocab {c.vocab_size}, "
            f"{size} params, {dtype}, {weights}")


def build_builtin(name: str, *, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 0) -> Transformer:
    """The built-in model `name` on `device`, in `dtype` (default: the entry's), in eval mode.

    Random weights are drawn from `seed` and are the same on every run (tiny models: on
    every device too); an entry with a weights file loads it (and ignores `seed`). Raises
    KeyError for an unknown name, with a did-you-mean; ModelLoadError when the weights file
    is missing or does not hold the entry's config.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(unknown_name_message(name))
    entry = BUILTIN_MODELS[name]
    if entry.weights is not None:
        from .checkpoint import ModelLoadError, load_model  # late: checkpoint imports this module
        path = DATA_DIR / entry.weights
        if not path.is_file():
            raise ModelLoadError(f"the weights of builtin:{name} are missing", path=path,
                                 hint="reinstall planlang, or train them: python -m planlang.runtime.models.train_tiny")
        model = load_model(str(path), device=device, dtype=dtype or entry.dtype).model
        if model.config != entry():
            raise ModelLoadError(f"the weights file does not hold builtin:{name}'s config", path=path,
                                 hint="train the weights again: python -m planlang.runtime.models.train_tiny")
        return model
    config = entry()
    with torch.device("meta"):
        model = Transformer(config)  # no memory and no default init: every weight is drawn below
    model = model.to(dtype=dtype or entry.dtype).to_empty(device=device)
    model.tie_weights()
    draw_device = "cpu" if config.num_parameters() < _DRAW_ON_CPU_BELOW else device
    init_random_weights(model, seed, draw_device)
    model.init_rope(config.max_seq_len, device)
    return model.eval()


@torch.no_grad()
def init_random_weights(model: Transformer, seed: int, draw_device="cpu") -> None:
    """Fill every parameter from a generator seeded with `seed`, drawn in float32 on
    `draw_device` in `named_parameters` order, so the result is reproducible.

    Linear weights: normal with std fan_in ** -0.5 (output projections wo, w2 also divided
    by sqrt(2 * n_layers), GPT-2 style, so the residual stream stays O(1)); embedding std
    dim ** -0.5 (logits of the tied head come out with std about 1); norm weights 1 + N(0, 0.1)
    in effect (so a kernel that ignores them is caught); sink logits N(0, 1).
    """
    config = model.config
    gen = torch.Generator(device=draw_device).manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.empty(param.shape, dtype=torch.float32, device=draw_device)
        if name.endswith("norm.weight"):
            values.normal_(0.0, 0.1, generator=gen).add_(1.0 - config.norm_offset)
        elif name.endswith("sinks"):
            values.normal_(0.0, 1.0, generator=gen)
        elif name == "embed.weight":
            values.normal_(0.0, config.dim ** -0.5, generator=gen)
        else:
            std = param.shape[1] ** -0.5
            if name.endswith(("wo.weight", "w2.weight")):
                std /= math.sqrt(2 * config.n_layers)
            values.normal_(0.0, std, generator=gen)
        param.copy_(values)
