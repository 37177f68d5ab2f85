"""`planlang apply PLAN FOLDER` on a Hugging Face model folder (config.json + safetensors),
offline: a tiny Llama saved with `save_pretrained`, decoded over a transformers
StaticCache by both the unplanned and the planned model."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from planlang.cli import main  # noqa: E402

from .kernel_switch import kernels  # noqa: E402


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_llama")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_apply_runs_a_hugging_face_folder_and_checks_it_against_the_unplanned_model(llama_folder, tmp_path, capsys):
    plan = tmp_path / "hf.yaml"
    plan.write_text("planlang: 1\nname: hf\nfusions: [rmsnorm_residual, qkv, swiglu, attention]\n")
    with kernels(reference=True):  # the passes are under test here; the kernels have their own tests
        code = main(["apply", str(plan), llama_folder, "--device", "cpu", "--json", "--eval-tokens", "64",
                     "--context", "8"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    result = json.loads(out)
    assert result["model"] == llama_folder
    places = {r["what"]: r["places"] for r in result["report"]["rules"]}
    flat = {p for ps in places.values() for p in ps}
    # every layer's attention (over the static cache), QKV and gate/up were fused
    for layer in (0, 1):
        assert f"model.layers.{layer}.self_attn" in flat and f"model.layers.{layer}.mlp" in flat, places
    assert result["numerics"]["rel_error"] < 1e-4 and result["numerics"]["top1_agreement"] == 1.0
    assert result["accuracy"]["top1_agreement"] == 1.0
    assert result["time_ms"]["unplanned"] > 0 and result["time_ms"]["planned"] > 0
