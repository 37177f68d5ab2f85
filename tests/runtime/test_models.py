"""The built-in models, their KV cache and generation loop, and the model sources of §12."""
from __future__ import annotations

import dataclasses
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F

from planlang.runtime.models.checkpoint import (
    LoadedModel, ModelLoadError, export_checkpoint, load_model,
)
from planlang.runtime.models.llama import (
    ModelConfig, RMSNorm, Transformer, apply_rope, attention_mask, explicit_attention,
    generate, rope_tables, sample,
)
from planlang.runtime.models.registry import (
    BUILTIN_MODELS, DEFAULT_MODEL, build_builtin, builtin_names, describe,
)

TINY = ["llama-tiny", "gemma2-tiny", "sinks-tiny"]
F32 = dict(atol=1e-5, rtol=1e-5)


def tokens(batch: int, length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, vocab, (batch, length))


def variant(model: Transformer, **changes) -> Transformer:
    """The same weights under a changed config (extra or missing sink weights ignored)."""
    other = Transformer(dataclasses.replace(model.config, **changes))
    other.load_state_dict(model.state_dict(), strict=False)
    return other.eval()


# --- shapes and names -------------------------------------------------------------------

def test_module_names_are_those_of_the_spec():
    model = build_builtin("llama-tiny")
    names = {name for name, _ in model.named_modules()}
    for i in range(model.config.n_layers):
        for suffix in ("attn_norm", "attn", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "attn.kv_cache",
                       "mlp_norm", "mlp", "mlp.w1", "mlp.w2", "mlp.w3"):
            assert f"layers.{i}.{suffix}" in names
    assert {"embed", "norm", "lm_head"} <= names
    assert isinstance(model.layers[0].attn_norm, RMSNorm)
    assert model.lm_head.weight is model.embed.weight


def test_state_dict_holds_weights_only():
    model = build_builtin("sinks-tiny")
    model.setup_caches(2, 16)
    keys = set(model.state_dict())
    assert "layers.0.attn.sinks" in keys
    assert not any("cache" in k or "rope" in k for k in keys)


@pytest.mark.parametrize("name", TINY)
def test_forward_gives_logits_per_position(name):
    model = build_builtin(name)
    logits = model(tokens(3, 7))
    assert logits.shape == (3, 7, 256)
    assert torch.isfinite(logits).all()


def test_setup_caches_allocates_one_static_cache_per_layer():
    model = build_builtin("llama-tiny")
    model.setup_caches(max_batch=3, max_seq_len=40)
    for block in model.layers:
        cache = block.attn.kv_cache
        assert cache.k_cache.shape == cache.v_cache.shape == (3, 2, 40, 16)
        assert cache.k_cache.dtype == torch.float32
    assert model.caches_fit(3, 40) and not model.caches_fit(4, 40) and not model.caches_fit(3, 41)


def test_setup_caches_grows_the_rope_table_past_max_seq_len():
    model = build_builtin("llama-tiny")
    model.setup_caches(1, model.config.max_seq_len + 10)
    assert model.rope_cos.shape[0] >= model.config.max_seq_len + 10


# --- numerics of the pieces -------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_matches_the_formula(offset):
    torch.manual_seed(1)
    norm = RMSNorm(32, eps=1e-6, offset=offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 32)
    ref = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (offset + norm.weight.double())
    torch.testing.assert_close(norm(x).double(), ref, **F32)


def test_rope_rotates_each_half_pair_as_a_complex_number():
    torch.manual_seed(2)
    head_dim, theta = 16, 10000.0
    cos, sin = rope_tables(12, head_dim, theta)
    x = torch.randn(2, 3, 12, head_dim)
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angle = torch.arange(12, dtype=torch.float64)[:, None] * freqs
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), ref, **F32)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    cos, sin = rope_tables(64, 16, 500000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(10, 3), score(50, 43), **F32)
    assert not torch.allclose(score(10, 3), score(10, 4), atol=1e-4)


def naive_attention(q, k, v, window=None, softcap=None, sinks=None):
    """Float64, one query at a time, the allowed keys listed explicitly."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                lo = 0 if window is None else max(0, i - window + 1)
                keys = list(range(lo, i + 1))
                s = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / math.sqrt(D)
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                e = torch.exp(s - s.max())
                denom = e.sum()
                if sinks is not None:
                    denom = denom + torch.exp(sinks[h].double() - s.max())
                out[b, h, i] = sum(e[n] / denom * v[b, h, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("window,softcap,with_sinks", [
    (None, None, False), (4, None, False), (None, 2.0, False), (None, None, True), (3, 1.5, True),
])
def test_explicit_attention_matches_a_naive_reference(window, softcap, with_sinks):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 8) * 2 for _ in range(3))
    sinks = torch.randn(3) if with_sinks else None
    pos = torch.arange(10)
    out = explicit_attention(q, k, v, attention_mask(pos, pos, window), softcap, sinks)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, window, softcap, sinks), **F32)


def test_sliding_window_mask_sees_the_last_w_positions_only():
    mask = attention_mask(torch.tensor([0, 5, 9]), torch.arange(12), window=3)
    assert mask[0].nonzero().flatten().tolist() == [0]
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5]
    assert mask[2].nonzero().flatten().tolist() == [7, 8, 9]


def test_plain_attention_path_equals_the_explicit_one():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    pos = torch.arange(9)
    mask = attention_mask(pos, pos, None)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               explicit_attention(q, k, v, mask), **F32)


# --- the variants really differ ---------------------------------------------------------

def test_gemma2_windows_the_even_layers_only():
    model = build_builtin("gemma2-tiny")
    assert [block.attn.window for block in model.layers] == [8, None]
    assert all(block.attn.explicit for block in model.layers)  # soft-cap on both
    assert not build_builtin("llama-tiny").layers[0].attn.explicit


def test_sliding_window_hides_tokens_older_than_the_window():
    # One windowed layer: position p sees tokens p-W+1..p only, so changing token 0
    # changes logits at positions < W and nothing from W on.
    config = dataclasses.replace(BUILTIN_MODELS["gemma2-tiny"](), n_layers=1, sliding_window=4)
    model = Transformer(config).eval()
    a = tokens(1, 10, seed=6)
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 256
    la, lb = model(a), model(b)
    changed = (la - lb).abs().amax(dim=-1)[0]
    assert (changed[:4] > 1e-6).all()
    assert (changed[4:] == 0).all()


def test_attention_softcap_changes_outputs_when_scores_are_large():
    model = build_builtin("gemma2-tiny")
    with torch.no_grad():
        for block in model.layers:
            block.attn.wq.weight.mul_(30.0)  # scores near the cap of 50
    x = tokens(2, 12, seed=7)
    diff = (model(x) - variant(model, attn_softcap=None)(x)).abs().max()
    assert diff > 1e-2


def test_final_softcap_bounds_the_logits():
    model = build_builtin("gemma2-tiny")
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    x = tokens(2, 6, seed=8)
    assert model(x).abs().max() <= 30.0
    assert variant(model, final_softcap=None)(x).abs().max() > 30.0


def test_sinks_take_probability_from_the_keys():
    model = build_builtin("sinks-tiny")
    x = tokens(2, 12, seed=9)
    plain = variant(model, attn_sinks=False, arch="llama")
    assert (model(x) - plain(x)).abs().max() > 1e-3
    with torch.no_grad():
        for block in model.layers:
            block.attn.sinks.fill_(-1e4)  # a sink with no weight is plain attention
    torch.testing.assert_close(model(x), plain(x), **F32)


# --- KV cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_prefill_then_decode_equals_one_full_forward(name):
    model = build_builtin(name)
    x = tokens(2, 20, seed=10)  # longer than gemma2-tiny's window of 8
    with torch.no_grad():
        full = model(x)
        model.setup_caches(max_batch=4, max_seq_len=32)  # more rows and positions than used
        steps = [model(x[:, :6], torch.arange(6))]
        steps += [model(x[:, p:p + 1], torch.tensor([p])) for p in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **F32)


def test_dynamo_traces_prefill_and_decode_in_one_graph_each():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build_builtin("gemma2-tiny")
    x = tokens(2, 8, seed=11)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 16)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        steps = [compiled(x[:, :5], torch.arange(5))] + [compiled(x[:, p:p + 1], torch.tensor([p])) for p in (5, 6, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **F32)
    assert len(graphs) == 2
    paths = {str(list(n.meta["nn_module_stack"].values())[-1][0])
             for n in graphs[0].graph.nodes if n.meta.get("nn_module_stack")}
    assert any(p.endswith("layers.0.attn.wq") for p in paths)
    torch._dynamo.reset()


# --- generation -------------------------------------------------------------------------

def test_greedy_generation_takes_the_argmax_of_a_full_forward():
    model = build_builtin("llama-tiny")
    prompt = tokens(2, 5, seed=12)
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        expected = Transformer(model.config).eval()
        expected.load_state_dict(model.state_dict())
        logits = expected(out)
    assert torch.equal(out[:, 5:], logits[:, 4:-1].argmax(-1))


def test_seeded_sampling_is_reproducible():
    model = build_builtin("gemma2-tiny")
    prompt = tokens(2, 4, seed=13)
    runs = [generate(model, prompt, 8, temperature=0.8, top_k=50, top_p=0.9,
                     generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_generate_uses_the_given_sample_fn():
    model = build_builtin("sinks-tiny")
    seen = []

    def sample_fn(logits):
        seen.append(logits.shape)
        return torch.full((logits.shape[0],), 7, dtype=torch.long)

    out = generate(model, tokens(3, 4, seed=14), 5, sample_fn=sample_fn)
    assert (out[:, 4:] == 7).all()
    assert seen == [(3, 256)] * 5


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(15)
    logits = torch.randn(6, 100)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=gen), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_k_draws_only_among_the_k_largest():
    torch.manual_seed(16)
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(0)
    allowed = logits.topk(5, dim=-1).indices
    for _ in range(50):
        drawn = sample(logits, 2.0, top_k=5, generator=gen)
        assert (allowed == drawn[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, top_p=0.7, generator=gen).item() for _ in range(200)}
    assert drawn == {0, 1}


# --- registry ---------------------------------------------------------------------------

def test_builtin_weights_are_the_same_on_every_build():
    a, b = build_builtin("gemma2-tiny"), build_builtin("gemma2-tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_builtin("gemma2-tiny", seed=1)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_builtin_dtype_can_be_overridden():
    model = build_builtin("llama-tiny", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    ref = build_builtin("llama-tiny")
    torch.testing.assert_close(model.embed.weight.float(), ref.embed.weight, atol=0, rtol=1e-2)


def test_llama_1b_has_the_shape_of_llama_3_2_1b():
    config = BUILTIN_MODELS["llama-1b"]()
    assert config.num_parameters() == 1_235_814_400
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    assert model.lm_head.weight is model.embed.weight
    assert BUILTIN_MODELS["llama-1b"].dtype == torch.bfloat16
    assert "1.24B" in describe("llama-1b")


def test_llama_8b_is_untied_with_8b_parameters():
    config = BUILTIN_MODELS["llama-8b"]()
    assert not config.tie_embeddings
    assert config.num_parameters() == 8_030_261_248


def test_registry_lists_the_builtin_models():
    assert DEFAULT_MODEL == "llama-tiny"
    assert {"llama-tiny", "gemma2-tiny", "sinks-tiny", "llama-1b", "llama-8b"} <= set(builtin_names())
    assert describe("llama-tiny").startswith("llama-tiny: ")


def test_unknown_builtin_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'llama-tiny'"):
        build_builtin("llama-tiy")


def test_config_round_trips_through_a_dict():
    config = BUILTIN_MODELS["gemma2-tiny"]()
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})


# --- model sources ----------------------------------------------------------------------

def test_no_spec_loads_the_default_builtin():
    loaded = load_model(None)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.kind, loaded.name, loaded.source) == ("builtin", DEFAULT_MODEL, "builtin:llama-tiny")
    assert loaded.config == BUILTIN_MODELS[DEFAULT_MODEL]().to_dict()


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    model = build_builtin(name, seed=3)
    path = export_checkpoint(model, tmp_path / f"{name}.pt", name=name)
    loaded = load_model(str(path))
    assert (loaded.kind, loaded.name, loaded.source) == ("checkpoint", name, str(path))
    assert loaded.config == model.config.to_dict()
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    x = tokens(2, 12, seed=17)
    assert torch.equal(loaded.model(x), model(x))


def test_checkpoint_is_readable_with_weights_only(tmp_path):
    path = export_checkpoint(build_builtin("llama-tiny"), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert (payload["format"], payload["version"], payload["arch"]) == ("planlang-checkpoint", 1, "llama")
    assert "lm_head.weight" not in payload["state_dict"]  # tied: stored once


def test_checkpoint_loads_in_another_dtype(tmp_path):
    path = export_checkpoint(build_builtin("llama-tiny"), tmp_path / "m.pt")
    model = load_model(path, dtype=torch.bfloat16).model
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(tokens(1, 4)).dtype == torch.bfloat16


def expect_error(spec, match, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(spec, **kwargs)
    assert str(spec) in str(info.value)
    assert info.value.hint
    return info.value


def test_missing_file_is_named(tmp_path):
    expect_error(str(tmp_path / "nope.pt"), "no such file")


def test_bare_builtin_name_hints_the_prefix():
    err = expect_error("gemma2-tiny", "no such file")
    assert "builtin:gemma2-tiny" in err.hint


def test_unknown_builtin_name_is_a_load_error_with_a_suggestion():
    expect_error("builtin:sinks-tin", "did you mean 'sinks-tiny'")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    expect_error(path, "empty file")


def test_text_file_is_not_a_pytorch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("planlang: 1\n")
    expect_error(path, "not a PyTorch file")


def test_truncated_checkpoint_is_refused(tmp_path):
    path = export_checkpoint(build_builtin("llama-tiny"), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated or corrupt")


def test_zip_that_is_not_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    expect_error(path, "truncated or corrupt PyTorch file")


def test_wrong_format_key_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "someone-else", "state_dict": {}}, path)
    expect_error(path, "not a planlang checkpoint .its 'format' is 'someone-else'")


def test_bare_state_dict_gets_a_hint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_builtin("llama-tiny").state_dict(), path)
    err = expect_error(path, "not a planlang checkpoint")
    assert "bare state_dict" in err.hint


def edited_checkpoint(tmp_path, edit):
    path = export_checkpoint(build_builtin("llama-tiny"), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def test_unknown_arch_is_refused(tmp_path):
    path = edited_checkpoint(tmp_path, lambda p: p.update(arch="mamba"))
    expect_error(path, "unknown arch 'mamba'")


def test_newer_checkpoint_version_is_refused(tmp_path):
    path = edited_checkpoint(tmp_path, lambda p: p.update(version=2))
    expect_error(path, "checkpoint version 2")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = edited_checkpoint(tmp_path, lambda p: p["state_dict"].pop("layers.1.mlp.w2.weight"))
    expect_error(path, "missing layers.1.mlp.w2.weight")
    path = edited_checkpoint(tmp_path, lambda p: p["config"].update(ffn_dim=100))
    expect_error(path, "weights do not fit the config")


def test_pickled_module_is_refused_without_trust(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(build_builtin("llama-tiny"), path)
    expect_error(path, r"pickled Python objects \(planlang\.runtime\.models\.llama\.")


def test_legacy_format_pickled_module_is_refused_without_trust(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(torch.nn.Linear(4, 4), path, _use_new_zipfile_serialization=False)
    expect_error(path, "pickled Python objects")


def test_pickled_module_loads_with_trust_and_a_warning(tmp_path):
    model = build_builtin("llama-tiny")
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.warns(UserWarning, match="executes code"):
        loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.config == model.config.to_dict()
    x = tokens(1, 6, seed=18)
    assert torch.equal(loaded.model(x), model(x))


def test_folder_without_config_json_is_not_a_hf_model(tmp_path):
    expect_error(tmp_path, "without config.json")


def test_hf_folder_without_transformers_says_what_to_install(tmp_path):
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed")
    except ImportError:
        pass
    (tmp_path / "config.json").write_text("{}")
    err = expect_error(tmp_path, "needs transformers")
    assert "planlang[hf]" in err.hint


def test_hf_folder_loads_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(19)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert (loaded.kind, loaded.source) == ("hf", str(tmp_path))
    assert loaded.config["hidden_size"] == 32
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model(tokens(1, 5, vocab=128)).logits.shape == (1, 5, 128)
