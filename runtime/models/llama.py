"""The built-in decoder: a Llama-style transformer with a static KV cache, gpt-fast style.

One class covers the three families the built-in models need, switched by `ModelConfig`:
plain Llama (SwiGLU, causal attention through `F.scaled_dot_product_attention`),
Gemma-2-like (GeGLU, `(1 + w)` norms, scaled embeddings, soft-capped attention and logits,
a sliding window on alternate layers) and gpt-oss-like attention sinks. It is written in
plain PyTorch ops with no data-dependent Python control flow, so Dynamo traces the whole
forward into one graph; every branch below reads the config or a module attribute, which
Dynamo turns into guards.

Module names are those of PLAN_SPEC.md §3: `embed`, `layers.N.{attn_norm, attn, mlp_norm,
mlp}`, `layers.N.attn.{wq, wk, wv, wo, kv_cache}`, `layers.N.mlp.{w1, w2, w3}`, `norm`,
`lm_head`. The residual adds live in `Block.forward`, so `x + attn(...)` feeding
`mlp_norm` is the `rmsnorm_residual` site.

Differences from the real Gemma-2 / gpt-oss, on purpose: no post-attention/post-MLP norms,
scale is `head_dim ** -0.5`, no Llama-3 RoPE frequency scaling, no attention biases.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("llama", "gemma2", "sinks")


@dataclass
class ModelConfig:
    """Shape and numerics of a built-in decoder. `to_dict`/`from_dict` round-trip it."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: Optional[int] = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 2048  # RoPE table size; setup_caches grows it when asked for more
    tie_embeddings: bool = True
    act: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    norm_offset: float = 0.0  # 0.0 Llama; 1.0 Gemma: the norm weight applies as (1 + w)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(dim)
    attn_softcap: Optional[float] = None  # Gemma-2: scores = cap * tanh(scores / cap)
    final_softcap: Optional[float] = None  # Gemma-2: the same on the logits
    sliding_window: Optional[int] = None  # a query at p sees keys p - W + 1 .. p
    sliding_window_every: int = 1  # layer i uses the window when i % every == 0 (Gemma-2: 2)
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit joins the softmax denominator
    arch: str = "llama"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown act {self.act!r}; use 'silu' or 'gelu_tanh'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    def uses_window(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        return self.sliding_window is not None and layer % self.sliding_window_every == 0

    def num_parameters(self) -> int:
        """Parameter count, computed from the shapes (a tied LM head counts once)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + (self.n_heads if self.attn_sinks else 0)
        block = attn + 3 * d * self.ffn_dim + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build a config from `to_dict` output; an unknown key is a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


class RMSNorm(nn.Module):
    """Root-mean-square norm in float32, as Hugging Face computes it.

    Both offsets multiply by the weight in float32 and cast once at the end (the Gemma
    order; for Llama this differs from HF's `weight * h.to(dtype)` by one rounding in
    bf16 and not at all in float32).
    """

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.offset + self.weight.float())).to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache of keys and values, [max_batch, n_kv_heads, max_seq_len, head_dim].

    Empty (`None` buffers) until `allocate`; the buffers are not persistent, so they never
    reach a state dict or a checkpoint.

    FP8 mode (`to_fp8`, what a precision rule on `:kv_cache` sets up): keys and values are
    stored as FP8 codes with a float32 scale per KV head (`k_scale`, `v_scale` [n_kv_heads]).
    A write stores `fp8(clamp(x.float() / scale[h], -fmax, fmax))` (round to nearest even,
    saturating at the format's largest value: 448 for e4m3, 57344 for e5m2); `update`
    returns the cache read back as `codes.float() * scale[h]` in the dtype of the keys
    written. With `emulate=True` the cache stays in the compute dtype and holds those
    dequantized values: the same numbers, no bytes saved. `observer(cache, k, v)`, when set,
    sees every write before it happens (calibration and saturation counts); it is None in
    normal runs.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.register_buffer("k_scale", None, persistent=False)
        self.register_buffer("v_scale", None, persistent=False)
        self.fp8: Optional[str] = None  # "fp8_e4m3" | "fp8_e5m2" in FP8 mode
        self.fp8_dtype: Optional[torch.dtype] = None
        self.fmax = 0.0
        self.emulate = False
        self.observer: Optional[Callable] = None
        self._compute_dtype: Optional[torch.dtype] = None  # what allocate was asked for

    @property
    def ready(self) -> bool:
        return self.k_cache is not None

    def allocate(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # Zeros, not empty: masked slots are multiplied by a zero probability, and 0 * NaN is NaN.
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self._compute_dtype = dtype
        if self.fp8 is not None:  # FP8 mode survives a new allocation (larger batch, other device)
            if self.k_scale.shape != (n_kv_heads,):
                raise ValueError(f"KVCache: {n_kv_heads} KV heads, but the FP8 scales hold "
                                 f"{self.k_scale.shape[0]}; hint: calibrate the cache again (to_fp8)")
            self.k_scale, self.v_scale = self.k_scale.to(device), self.v_scale.to(device)
            dtype = dtype if self.emulate else self.fp8_dtype
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def to_fp8(self, fmt: str, k_scale: torch.Tensor, v_scale: torch.Tensor, emulate: bool = False) -> None:
        """Switch to FP8 storage (`fmt` fp8_e4m3 or fp8_e5m2) with per-KV-head scales [Hkv]
        (positive). An allocated cache is allocated again, zeroed, in the new storage dtype
        (its compute dtype kept for `emulate`)."""
        from ..precision.formats import format_max, fp8_dtype
        k_scale, v_scale = k_scale.detach().float().reshape(-1), v_scale.detach().float().reshape(-1)
        if k_scale.shape != v_scale.shape or not bool((k_scale > 0).all() and (v_scale > 0).all()):
            raise ValueError("KVCache.to_fp8: k_scale and v_scale must be positive [n_kv_heads] tensors")
        if self.ready and k_scale.shape != (self.k_cache.shape[1],):
            raise ValueError(f"KVCache.to_fp8: {k_scale.numel()} scales for {self.k_cache.shape[1]} KV heads")
        if self.ready:
            k_scale, v_scale = k_scale.to(self.k_cache.device), v_scale.to(self.k_cache.device)
        self.fp8, self.fp8_dtype, self.fmax, self.emulate = fmt, fp8_dtype(fmt), format_max(fmt), bool(emulate)
        self.k_scale, self.v_scale = k_scale.contiguous(), v_scale.contiguous()
        if self.ready:
            self.allocate(*self.k_cache.shape, self._compute_dtype, self.k_cache.device)

    def to_compute_dtype(self) -> None:
        """Leave FP8 storage: the cache holds keys and values in its compute dtype again
        (allocated again, zeroed, when it was allocated)."""
        if self.fp8 is None:
            return
        self.fp8, self.fp8_dtype, self.fmax, self.emulate = None, None, 0.0, False
        self.k_scale = self.v_scale = None
        if self.ready:
            self.allocate(*self.k_cache.shape, self._compute_dtype, self.k_cache.device)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [B, Hkv, T, D] as the cache stores it: FP8 codes of clamp(x / scale[h]), or
        (emulated) those codes times the scale in the cache's dtype."""
        s = scale.view(1, -1, 1, 1)
        q = (x.float() / s).clamp(-self.fmax, self.fmax).to(self.fp8_dtype)
        if self.emulate:
            return (q.float() * s).to(self.k_cache.dtype)
        return q

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, D] at positions `input_pos` [T]; return the caches' first B rows
        (FP8 mode: dequantized, in k's dtype)."""
        if self.observer is not None:
            self.observer(self, k, v)
        batch = k.shape[0]
        k_out, v_out = self.k_cache[:batch], self.v_cache[:batch]
        if self.fp8 is None:
            k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
            v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
            return k_out, v_out
        kq, vq = self.quantize(k, self.k_scale), self.quantize(v, self.v_scale)
        if self.emulate:
            k_out.index_copy_(2, input_pos, kq)
            v_out.index_copy_(2, input_pos, vq)
            return k_out, v_out
        # index_copy_ has no FP8 kernels: the codes are copied as bytes.
        k_out.view(torch.uint8).index_copy_(2, input_pos, kq.view(torch.uint8))
        v_out.view(torch.uint8).index_copy_(2, input_pos, vq.view(torch.uint8))
        k_scale, v_scale = self.k_scale.view(1, -1, 1, 1), self.v_scale.view(1, -1, 1, 1)
        return (k_out.float() * k_scale).to(k.dtype), (v_out.float() * v_scale).to(v.dtype)


def rope_tables(length: int, head_dim: int, theta: float, device=None):
    """cos and sin [length, head_dim] in float32, halves repeated (HF's rotate_half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos, sin [T, D], in x's dtype as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean [T, S], True where query position q_pos[i] may see key position k_pos[j]."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    return allowed


def explicit_attention(q, k, v, mask, softcap: Optional[float] = None,
                       sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention written out: q [B, H, T, D], k, v [B, H, S, D], mask [T, S] (True = see).

    scores = q k^T / sqrt(D); soft-cap; mask; a per-head sink logit joins the softmax
    denominator and is dropped after; softmax in float32; times v.
    """
    scores = (q @ k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache = KVCache()
        self.softcap = config.attn_softcap
        self.window = config.sliding_window if config.uses_window(layer) else None
        self.sinks = nn.Parameter(torch.zeros(config.n_heads)) if config.attn_sinks else None
        # Plain causal attention goes to SDPA; the variants are written out.
        self.explicit = self.softcap is not None or self.sinks is not None or self.window is not None

    def forward(self, x, input_pos, cos, sin, mask):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache.ready:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.explicit:
            y = explicit_attention(q, k, v, mask, self.softcap, self.sinks)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x), SwiGLU or GeGLU (tanh GELU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down
        self.act = config.act

    def forward(self, x):
        gate = self.w1(x)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.w2(gate * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, config.norm_offset)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, config.norm_offset)
        self.mlp = MLP(config)

    def forward(self, x, input_pos, cos, sin, mask):
        h = x + self.attn(self.attn_norm(x), input_pos, cos, sin, mask)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """The decoder. `forward(tokens [B, T], input_pos [T]) -> logits [B, T, vocab]`.

    With caches (`setup_caches`), keys and values are written at `input_pos` and each
    query sees every cached position <= its own (and within its window): prefill then
    decode one token at a time. Without caches, attention sees only this call's tokens,
    which is a full forward when `input_pos` is 0..T-1 (the default).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, config.norm_offset)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.max_batch = 0
        self.max_seq_len = 0
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.init_rope(config.max_seq_len)

    def tie_weights(self) -> None:
        """Make the LM head's weight the embedding's (again: `to_empty` and `assign` untie)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_rope(self, length: int, device=None) -> None:
        """(Re)compute the RoPE tables for positions 0..length-1, on `device` (default: the weights')."""
        device = device or self.embed.weight.device
        cos, sin = rope_tables(length, self.config.head_dim, self.config.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate zeroed KV caches for `max_batch` rows of `max_seq_len` positions in every
        layer (dtype and device default to the weights'), replacing any earlier ones."""
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        for block in self.layers:
            attn = block.attn
            attn.kv_cache.allocate(max_batch, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype, device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        if self.rope_cos is None or self.rope_cos.shape[0] < max_seq_len or self.rope_cos.device != torch.device(device):
            self.init_rope(max(max_seq_len, self.config.max_seq_len), device)

    def caches_fit(self, batch: int, seq_len: int) -> bool:
        """Whether caches are set up and hold `batch` rows of `seq_len` positions."""
        return self.layers[0].attn.kv_cache.ready and batch <= self.max_batch and seq_len <= self.max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if self.layers[0].attn.kv_cache.ready:
            k_pos = torch.arange(self.layers[0].attn.kv_cache.k_cache.shape[2], device=tokens.device)
        else:
            k_pos = input_pos
        causal = attention_mask(input_pos, k_pos, None)
        window = self.config.sliding_window
        local = causal if window is None else attention_mask(input_pos, k_pos, window)
        for block in self.layers:
            x = block(x, input_pos, cos, sin, causal if block.attn.window is None else local)
        logits = self.lm_head(self.norm(x))
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of logits [B, V] -> [B] (int64).

    temperature <= 0 is greedy (argmax). Otherwise, in float32: divide by temperature, keep
    the top_k largest logits, then keep the smallest set of most probable tokens whose
    probability sums to at least top_p (the most probable always stays), and draw from the
    softmax of what is left with `torch.multinomial`.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None,
             sample_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Prefill `prompt` [B, T], then decode `max_new_tokens` one at a time; returns
    [B, T + max_new_tokens] (the prompt, then the new tokens).

    Caches are set up for B x (T + max_new_tokens) unless the ones present already fit
    (so a planned model keeps the caches its graphs were captured on). `sample_fn(logits
    [B, V]) -> [B]` replaces the default `sample` with these settings.
    """
    bsz, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if hasattr(model, "setup_caches") and not model.caches_fit(bsz, total):
        model.setup_caches(bsz, total)
    if sample_fn is None:
        def sample_fn(logits):
            return sample(logits, temperature, top_k, top_p, generator)
    out = torch.empty(bsz, total, dtype=torch.long, device=prompt.device)
    out[:, :prompt_len] = prompt
    if max_new_tokens == 0:
        return out
    logits = model(prompt, torch.arange(prompt_len, device=prompt.device))
    out[:, prompt_len] = sample_fn(logits[:, -1])
    for pos in range(prompt_len, total - 1):
        input_pos = torch.tensor([pos], device=prompt.device)
        logits = model(out[:, pos:pos + 1], input_pos)
        out[:, pos + 1] = sample_fn(logits[:, -1])
    return out
