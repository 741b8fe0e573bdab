"""Optimizer state follows the growth of Hugging Face models (graphgrow.optim): the dual map's defining property
on a GQA Llama (widen x2, fill + rescale x1.5, block copy), Adafactor's factored second moments, upcycled
experts."""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.optim import grow_optimizer, growth_map  # noqa: E402

from tests.fx.test_optim_state import dual_error  # noqa: E402


def _float64_rms_norm(self, hidden_states):
    # LlamaRMSNorm computes in float32 whatever the model's dtype: a float64 model then carries float32
    # rounding (1e-7) into every gradient. The property is about the maps, so the norm computes in float64 here.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def llama(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _float64_rms_norm)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, torch.randint(0, 96, (2, 10))


def _loss(ids):
    return lambda m: m(ids, labels=ids).loss


@pytest.mark.parametrize("grow", ["widen x2", "widen x1.5", "block copy"])
def test_dual_map_llama(llama, grow):
    model, ids = llama
    if grow == "block copy":
        student = graphgrow.deepen(model, after=r"model\.layers\.0", block="copy", example_inputs=ids)
    else:
        student = graphgrow.widen(model, 2 if grow == "widen x2" else 1.5, example_inputs=ids)
    worst, none, gmap = dual_error(model, student, _loss(ids))
    assert worst <= 1e-10
    if grow == "block copy":  # the copy (layer 1 now) starts fresh: zeroed projections and unused copies
        assert none and all(n.startswith("model.layers.1.") for n in none)
        assert gmap.unused and all(n.startswith("model.layers.1.") for n in gmap.unused)
    else:
        assert none == []


def test_adafactor_factored_state(llama):
    from transformers.optimization import Adafactor

    model, ids = llama
    model = copy.deepcopy(model).train()
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    for _ in range(2):
        opt.zero_grad()
        _loss(ids)(model).backward()
        opt.step()
    student = graphgrow.widen(model, 2, example_inputs=ids)
    grown = grow_optimizer(opt, model, student, "dual")
    for name, p in student.named_parameters():
        s = grown.state[p]
        if p.ndim >= 2:
            assert s["exp_avg_sq_row"].shape == p.shape[:-1] and s["exp_avg_sq_col"].shape == p.shape[-1:]
            assert torch.all(s["exp_avg_sq_row"] > 0)
        else:
            assert s["exp_avg_sq"].shape == p.shape
        assert s["step"] == 2
    opt2 = grown
    opt2.zero_grad()
    _loss(ids)(student).backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_upcycled_experts_take_the_mlp_state(llama):
    model, ids = llama
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.zero_grad()
    _loss(ids)(model).backward()
    opt.step()
    moe = graphgrow.upcycle(model, experts=4, top_k=2, router="random")
    names = {id(p): n for n, p in model.named_parameters()}
    mlp_avg = {names[id(p)]: s["exp_avg"] for p, s in opt.state.items()}
    copied = grow_optimizer(opt, model, moe, "copy")
    dual = grow_optimizer(opt, model, moe, "dual")
    by_name = dict(moe.named_parameters())
    # Mixtral stores the four experts stacked: every expert's gate/up rows copy the dense MLP's state
    gate_up = [n for n in by_name if n.endswith("experts.gate_up_proj")][0]
    layer = gate_up.split(".mlp.")[0]
    dense_gate = mlp_avg[f"{layer}.mlp.gate_proj.weight"]
    got = copied.state[by_name[gate_up]]["exp_avg"]
    assert got.shape[0] == 4 and all(torch.equal(got[e, :dense_gate.shape[0]], dense_gate) for e in range(4))
    # the routers are new (drawn): no teacher entry, no state
    router = [n for n in by_name if n.endswith("gate.weight") and "experts" not in n][0]
    assert by_name[router] not in copied.state
    # dual: the experts share the dense gradient (the sum over experts' state is the teacher's), or an expert
    # no token reached starts fresh
    if by_name[gate_up] in dual.state:
        total = dual.state[by_name[gate_up]]["exp_avg"][:, :dense_gate.shape[0]].sum(0)
        assert torch.allclose(total, dense_gate, rtol=1e-9, atol=1e-12)
