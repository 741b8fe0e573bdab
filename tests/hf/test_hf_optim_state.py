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


def test_copies_with_other_consumers_start_fresh_under_dual(monkeypatch):
    """Multi-query attention widened x2: the key/value head is copied and each copy serves half of the query
    heads, so a copy's gradient is its own query group's, not half of the original's: the dual map does not hold
    there (measured, not assumed), those parameters start fresh under "dual" and are named; the rest is dual."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _float64_rms_norm)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 96, (2, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _loss(ids)(model).backward()
    opt.step()
    student = graphgrow.widen(model, 2, example_inputs=ids)
    worst, none, gmap = dual_error(model, student, _loss(ids))
    kv = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "kv"}
    assert set(gmap.not_dual) == kv and min(gmap.not_dual.values()) > 0.1
    assert worst <= 1e-10 and set(none) == kv  # (every other parameter: the dual map, to float64 rounding)
    grown = grow_optimizer(opt, model, student, "dual")
    by_name = dict(student.named_parameters())
    assert set(grown.graphgrow_fresh) == kv and all("dual map" in why for why in grown.graphgrow_fresh.values())
    assert all(by_name[n] not in grown.state for n in kv)
    assert by_name["model.layers.0.self_attn.q_proj.weight"] in grown.state
    copied = grow_optimizer(opt, model, student, "copy")  # (copy makes no claim about gradients: all mapped)
    assert copied.graphgrow_fresh == {} and all(by_name[n] in copied.state for n in kv)


def test_router_cast_to_float32_replays_in_float64():
    """DeepSeek-V3's router casts its weight to float32 (``weight.type(torch.float32)``), a no-op in a float32
    model but a node in the float64 probes growth_map replays the widening on: the channel analysis reads through
    the cast, so the replay makes the same plan, and the dual map holds (float32 rounding)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from hf_testing import DENSE_BASE, MOE_FAMILIES

    cls_name, kwargs = MOE_FAMILIES["deepseek-v3"]
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**DENSE_BASE, **kwargs})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(3, 96, (2, 10))
    student = graphgrow.widen(model, 2, example_inputs=ids)
    worst, none, gmap = dual_error(model, student, _loss(ids))
    assert worst <= 1e-4 and not gmap.not_dual
    assert student.config.hidden_size == 64
