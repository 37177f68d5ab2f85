"""Training with the memory schedule: a step with offload (host AdamW on FP32 masters, the
ring walked forward and backward) and with recompute (full and selective) gives the
gradients and updated weights of the step without them; the chunked cross-entropy is the
cross-entropy; `planlang train-step` reports both runs.

Every comparison starts from the same weights and batch; on the CPU the kernels are the
same, so most results are bitwise equal (asserted within FP32 tolerance, as the issue
states). A test-local model with dropout checks that recomputation draws the same masks.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planlang.cli import main
from planlang.plan import Plan
from planlang.runtime.apply import apply
from planlang.runtime.memory.offload import prepare_offload
from planlang.runtime.memory.recompute import apply_recompute
from planlang.runtime.models.registry import build_builtin
from planlang.runtime.train import Trainer, chunked_cross_entropy, lm_batch

TOL = dict(rtol=1e-5, atol=1e-6)


def make_plan(**doc) -> Plan:
    plan, diags = Plan.from_document({"planlang": 1, "mode": "training", **doc})
    assert plan is not None, diags
    return plan


class DropoutStack(nn.Module):
    """A test-local model: residual blocks with dropout; loss is MSE against a target."""

    def __init__(self, dim=24, n=5, p=0.3):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                  nn.Dropout(p), nn.Linear(2 * dim, dim)) for _ in range(n))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x)


def schedule(model, doc):
    """The memory section of `doc` installed as `apply` installs it (apply itself, which also
    traces the model for fusions, runs in test_train_step_command_reports_both_runs)."""
    if doc is None:
        return None
    plan = make_plan(**doc)
    offload = prepare_offload(model, plan, "cpu", None, None) if plan.memory.offload else None
    apply_recompute(model, plan, None, None)
    if offload is not None:
        offload.arm()
    return offload


def mse(forward, batch):
    x, y = batch
    return F.mse_loss(forward(x), y)


def train_stack(doc, steps=2):
    """Weights after `steps` AdamW steps of the dropout model, planned by `doc` (None: no
    plan), the host-side gradients of the last step and the losses."""
    torch.manual_seed(0)
    model = DropoutStack()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(8, 24, generator=gen), torch.randn(8, 24, generator=gen)
    offload = schedule(model, doc)
    trainer = Trainer(model, model, offload=offload, loss=mse, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(123)  # the dropout masks
    losses = [float(trainer.step(batch)) for _ in range(steps)]
    grads = {}
    trainer.backward(batch)  # one more backward: where do the gradients land?
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[name] = p.grad.clone()
    if offload is not None:
        grads.update(offload.gradients())
        offload.disarm()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, grads, offload


@pytest.fixture(scope="module")
def stack_baseline():
    return train_stack(None)


@pytest.mark.parametrize("doc", [
    {"memory": {"offload": [{"at": "layers.*", "prefetch": 1}]}},
    {"memory": {"recompute": [{"at": "layers.*", "policy": "full"}]}},
    {"memory": {"recompute": [{"at": "layers.*", "policy": "selective", "save": ["linear"]}]}},
    {"memory": {"offload": [{"at": "layers.*.1", "prefetch": 1}],
                "recompute": [{"at": "layers.*", "policy": "selective", "save": ["act", "linear"]}]}},
], ids=["offload-all", "full", "selective-linear", "offload-inside-recompute"])
def test_dropout_model_step_with_the_schedule_equals_the_step_without(stack_baseline, doc):
    base_losses, base_weights, base_grads, _ = stack_baseline
    losses, weights, grads, offload = train_stack(doc)
    assert losses == pytest.approx(base_losses, rel=1e-6)
    assert weights.keys() == base_weights.keys()
    for name in base_weights:
        torch.testing.assert_close(weights[name], base_weights[name], **TOL, msg=name)
    assert grads.keys() == base_grads.keys()
    for name in base_grads:
        torch.testing.assert_close(grads[name], base_grads[name], **TOL, msg=name)
    if offload is not None:  # the offloaded gradients came from the host
        assert offload.stats()["rings"][0]["units"]


def test_recompute_really_recomputes():
    calls = []
    torch.manual_seed(0)
    model = DropoutStack(n=2)
    for layer in model.layers:
        layer[2].register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    x = torch.randn(4, 24)
    apply_recompute(model, make_plan(memory={"recompute": [{"at": "layers.*", "policy": "full"}]}), None, None)
    model.train()
    model(x).sum().backward()
    assert len(calls) == 4  # each GELU ran in the forward pass and again in the backward pass


def lm_run(doc, dtype=torch.float32, steps=2):
    model = build_builtin("llama-tiny", dtype=dtype)
    batch = lm_batch(256, 2, 12, torch.device("cpu"))
    offload = schedule(model, doc)
    trainer = Trainer(model, model, offload=offload, lr=1e-2)
    losses = [float(trainer.step(batch)) for _ in range(steps)]
    if offload is not None:
        offload.disarm()
    trainer.close()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_step_with_offload_and_recompute_equals_the_step_without(dtype):
    doc = {"memory": {"offload": [{"at": "layers[1:]", "prefetch": 0}],
                      "recompute": [{"at": "layers.*", "policy": "selective", "save": ["linear"]}]}}
    base_losses, base = lm_run(None, dtype)
    losses, weights = lm_run(doc, dtype)
    assert losses == pytest.approx(base_losses, rel=1e-6)
    for name in base:
        torch.testing.assert_close(weights[name], base[name], **TOL, msg=name)


@pytest.mark.parametrize("softcap,chunk", [(None, 5), (30.0, 7), (None, None)])
def test_chunked_cross_entropy_is_cross_entropy(softcap, chunk):
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(23, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (23,), generator=gen)
    t[3] = -100
    logits = h @ w.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits, t, ignore_index=-100)
    gh_want, gw_want = torch.autograd.grad(want, (h, w))
    got = chunked_cross_entropy(h, w, t, softcap=softcap, chunk=chunk)
    gh, gw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-6)


def write_plan(tmp_path, doc: str):
    path = tmp_path / "p.yaml"
    path.write_text(doc)
    return str(path)


def test_train_step_command_reports_both_runs(tmp_path, capsys):
    plan = write_plan(tmp_path, "planlang: 1\nmode: training\nmemory:\n  offload:\n    - at: \"layers[1:]\"\n"
                                "  recompute:\n    - at: \"layers.*\"\n      policy: full\n")
    code = main(["train-step", plan, "--batch", "2", "--seq", "16", "--steps", "1", "--format", "json",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    r = json.loads(out)
    assert set(r["runs"]) == {"unplanned", "planned"} and r["model"] == "builtin:llama-tiny"
    for run in r["runs"].values():
        assert run["step_ms"] > 0 and len(run["losses"]) == 2
        assert {"weights", "gradients", "optimizer"} <= set(run["memory_mib"])
    assert r["runs"]["planned"]["losses"] == pytest.approx(r["runs"]["unplanned"]["losses"], rel=1e-5)
    assert any(rule["section"] == "memory.recompute" and rule["places"] == ["layers.0", "layers.1"]
               for rule in r["report"]["rules"])
    # offloaded parameters leave the device optimizer: its state shrinks
    assert r["runs"]["planned"]["memory_mib"]["optimizer"] < r["runs"]["unplanned"]["memory_mib"]["optimizer"]


def test_train_step_refuses_an_inference_plan(tmp_path, capsys):
    plan = write_plan(tmp_path, "planlang: 1\nmemory:\n  recompute:\n    - at: \"layers.*\"\n")
    assert main(["train-step", plan, "--device", "cpu"]) == 2
    assert "mode: training" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on the GPU

@pytest.mark.gpu
def test_gpu_training_with_offload_equals_training_without():
    def run(doc):
        model = build_builtin("llama-tiny", device="cuda")
        batch = lm_batch(256, 2, 32, torch.device("cuda"))
        forward = offload = None
        if doc is not None:
            planned = apply(model, make_plan(**doc), device=torch.device("cuda"))
            forward, offload = planned, planned.offload
        trainer = Trainer(model, forward, offload=offload, lr=1e-2)
        losses = [float(trainer.step(batch)) for _ in range(3)]
        if offload is not None:
            offload.disarm()
        trainer.close()
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    base_losses, base = run(None)
    for doc in ({"memory": {"offload": [{"at": "layers.*", "prefetch": 0}]}},
                {"memory": {"offload": [{"at": "layers.*", "prefetch": 1}],
                            "recompute": [{"at": "layers.*", "policy": "full"}]}}):
        losses, weights = run(doc)
        assert losses == pytest.approx(base_losses, rel=1e-5)
        for name in base:
            torch.testing.assert_close(weights[name], base[name], rtol=1e-4, atol=1e-5, msg=name)


def backward_gemms(doc) -> int:
    """GEMMs the backward pass of the dropout model runs (recomputation included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                Count.n += 1
            return func(*args, **(kwargs or {}))
    torch.manual_seed(0)
    model = DropoutStack(n=3)
    schedule(model, doc)
    loss = model(torch.randn(4, 24)).square().mean()
    with Count():
        loss.backward()
    return Count.n


def test_selective_linear_recomputes_no_gemm_and_full_recomputes_them_all():
    recompute = lambda policy, save: {"memory": {"recompute": [  # noqa: E731
        {"at": "layers.*", "policy": policy, "save": save}]}}
    base = backward_gemms(None)
    assert backward_gemms(recompute("selective", ["linear"])) == base
    # PyTorch's SAC keeping only activations, and full recompute, run GEMMs again (all but
    # each layer's last, which the checkpoint's early stop skips)
    assert backward_gemms(recompute("selective", ["act"])) == base + 3
    assert backward_gemms(recompute("full", [])) == base + 3


def test_hugging_face_step_with_offload_and_recompute_equals_the_step_without():
    """Gemma-2: the decoder gives hidden states, the final soft-cap moves into the loss."""
    transformers = pytest.importorskip("transformers")
    arch = "Gemma2ForCausalLM"
    extra = {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0} if "Gemma" in arch else {}
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))

    def run(doc):
        config = config_cls(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=256, max_position_embeddings=64, **extra)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = getattr(transformers, arch)(config)
        offload = schedule(model, doc)
        trainer = Trainer(model, model, offload=offload, lr=1e-2)
        assert (trainer.lm.softcap is not None) == ("Gemma" in arch)
        batch = lm_batch(256, 2, 12, torch.device("cpu"))
        losses = [float(trainer.step(batch)) for _ in range(2)]
        if offload is not None:
            offload.disarm()
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    base_losses, base = run(None)
    losses, weights = run({"memory": {"offload": [{"at": "model.layers[1:]", "prefetch": 0}],
                                      "recompute": [{"at": "model.layers.*", "policy": "selective",
                                                     "save": ["linear"]}]}})
    assert losses == pytest.approx(base_losses, rel=1e-6)
    for name in base:
        torch.testing.assert_close(weights[name], base[name], **TOL, msg=name)
