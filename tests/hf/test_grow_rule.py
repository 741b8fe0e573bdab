"""Expert-count growth on routers that treat copies differently (graphgrow/hf/grow_rule.py): the rule measured on
the family's own block, the grown model exact with trained-like routers (selection biases and routers apart),
in memory and streamed, and group-limited routing grown group by group."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.hf.grow_rule import GrowRule, measure_grow_rule  # noqa: E402
from graphgrow.hf.moe_plan import UpcycleRefused  # noqa: E402
from graphgrow.hf.upcycle_stream import grow_experts_checkpoint  # noqa: E402
from graphgrow.optim import growth_map  # noqa: E402
from graphgrow.verify import check  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_testing import (DENSE_BASE, MOE_FAMILIES, logits, max_rel, saved_tensors, token_ids,  # noqa: E402
                        trained_like)

# the families whose routers treat copies differently, as hf_testing builds them (the benchmark's too)
MODELS = {name: MOE_FAMILIES[key] for name, key in (("ernie", "ernie4_5-moe"), ("llama4", "llama4"),
                                                      ("dots1", "dots1"), ("deepseek-v3", "deepseek-v3"),
                                                      ("mixtral", "mixtral"))}
RULES = {"ernie": GrowRule(selection=0.5), "llama4": GrowRule(output=0.5), "dots1": GrowRule(output=0.5),
         "deepseek-v3": GrowRule(), "mixtral": GrowRule()}
FIELDS = {"ernie": ("moe_num_experts", "moe_k"), "llama4": ("num_local_experts", "num_experts_per_tok"),
          "dots1": ("n_routed_experts", "num_experts_per_tok"), "deepseek-v3": ("n_routed_experts", "num_experts_per_tok"),
          "mixtral": ("num_local_experts", "num_experts_per_tok")}


def build(name, **extra):
    cls_name, kwargs = MODELS[name]
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**DENSE_BASE, **kwargs, **extra})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_rule_measured_on_the_family_block(name):
    model = build(name)
    block = next(k for k, m in model.named_modules() if hasattr(m, "experts") and k.rsplit(".", 1)[-1] in
                 ("mlp", "feed_forward"))
    e_field, k_field = FIELDS[name]
    fields = {e_field: 2 * getattr(model.config, e_field), k_field: 2 * getattr(model.config, k_field)}
    assert measure_grow_rule(model, block, 2, fields) == RULES[name]


@pytest.mark.parametrize("name", ["ernie", "llama4", "dots1", "deepseek-v3"])
def test_grown_exact_with_trained_routers(name):
    model = trained_like(build(name))
    grown = graphgrow.grow_experts(model, factor=2)
    rep = grown.graphgrow_report
    assert rep.function_preserving and rep.experts == 8
    x = token_ids(96, 1)
    assert max_rel(logits(model, x), logits(grown, x)) <= 1e-5
    rule = RULES[name]
    assert rep.down_scale == rule.output
    assert any("selection biases x 1/2" in n for n in rep.notes) == (rule.selection != 1.0)
    assert any("down-projections x 1/2" in n for n in rep.notes) == (rule.output != 1.0)


def test_ernie_bias_halved_and_copies_together():
    model = trained_like(build("ernie"))
    grown = graphgrow.grow_experts(model, factor=2)
    key = "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"
    old, new = model.state_dict()[key], grown.state_dict()[key]
    assert new.shape == (1, 8) and float(old.abs().max()) > 1e-3
    assert torch.equal(new, torch.repeat_interleave(old, 2, dim=1) * 0.5)
    # the same without the rule: the choice changes, the model differs (what the rule is for)
    keep = model.state_dict()[key].clone()
    assert float(max_rel(logits(model, token_ids(96, 1)), logits(grown, token_ids(96, 1)))) <= 1e-5
    with torch.no_grad():
        grown.get_parameter(key).copy_(torch.repeat_interleave(keep, 2, dim=1))
    assert max_rel(logits(model, token_ids(96, 1)), logits(grown, token_ids(96, 1))) > 1e-4


@pytest.mark.parametrize("norm", [True, False])
def test_group_limited_routing_grown_by_groups(norm):
    """DeepSeek-V3 with 8 experts in 2 groups, 1 chosen: in-place copies change the groups' scores (the rule
    refuses that layout); each group repeated as a block, n_group and topk_group x 2, is exact."""
    model = trained_like(build("deepseek-v3", n_routed_experts=8, n_group=2, topk_group=1, norm_topk_prob=norm))
    block = "model.layers.0.mlp"
    fields = {"n_routed_experts": 16, "num_experts_per_tok": 4}
    with pytest.raises(UpcycleRefused, match="group-limited routing"):
        measure_grow_rule(model, block, 2, dict(fields, n_group=2, topk_group=1))
    assert measure_grow_rule(model, block, 2, dict(fields, n_group=4, topk_group=2), groups=2) == \
        GrowRule(output=1.0 if norm else 0.5)
    grown = graphgrow.grow_experts(model, factor=2)
    cfg, rep = grown.config, grown.graphgrow_report
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 4, 4, 2)
    assert any("2 groups" in n for n in rep.notes)
    x = token_ids(96, 1)
    assert max_rel(logits(model, x), logits(grown, x)) <= 1e-5
    # group g's experts, once per copy: grown expert 4..7 copies source 0..3, 8..11 copies 4..7
    key = "model.layers.1.mlp.gate.weight"
    old, new = model.state_dict()[key], grown.state_dict()[key]
    assert torch.equal(new[4:8], old[0:4]) and torch.equal(new[8:12], old[4:8])


def test_group_limited_streamed_and_checked(tmp_path):
    model = trained_like(build("deepseek-v3", n_routed_experts=8, n_group=2, topk_group=1))
    model.save_pretrained(tmp_path / "src")
    graphgrow.grow_experts(model, factor=2).save_pretrained(tmp_path / "mem")
    result = grow_experts_checkpoint(tmp_path / "src", tmp_path / "dir", 2)  # (checked layer by layer)
    # (rotations within the copy sets run the copies of every expert some token picks; a group no token picks
    # stays idle with its copies)
    assert result["check"]["max_rel"] <= 1e-5 and result["check"]["experts_run"] >= 0.75 * result["check"]["experts_total"]
    a, b = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "dir")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["ernie", "dots1", "llama4"])  # (llama4: the layer check loads its bmm stack whole)
def test_streamed_equals_in_memory(name, tmp_path):
    model = trained_like(build(name))
    grown = graphgrow.grow_experts(model, factor=2)
    grown.save_pretrained(tmp_path / "mem")
    model.save_pretrained(tmp_path / "src")
    result = grow_experts_checkpoint(tmp_path / "src", tmp_path / "dir", 2)
    assert result["report"].down_scale == RULES[name].output
    a, b = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "dir")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float64_recheck_runs_on_grouped_mm_experts():
    model = build("mixtral")
    assert model.config._experts_implementation not in (None, "eager")  # transformers' default kernel
    other = build("mixtral")
    with torch.no_grad():
        other.model.layers[0].mlp.experts.down_proj.mul_(1.01)
    rep = check(_Logits(model), _Logits(other), (token_ids(96, 0),), backend="torch")
    assert not rep.passed and rep.recheck_note == "" and rep.float64 is not None
    assert float(rep.float64.worst.max_rel) > 1e-4
    assert np.isfinite(float(rep.float64.worst.max_rel))


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["ernie", "dots1"])
def test_optimizer_state_follows_the_rule(name):
    """grow_optimizer through an expert growth with scaled copies (and ERNIE's frozen score correction, which has
    no gradient): the dual map predicts the grown model's gradient, and the grown optimizer steps."""
    model = trained_like(build(name)).double()
    model.config._experts_implementation = "eager"
    ids = token_ids(96, 2)

    def loss(m):
        return m(ids, labels=ids).loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss(model).backward()
    opt.step()
    grown = graphgrow.grow_experts(model, factor=2)
    gmap = growth_map(model, grown)

    def grads(m):
        params = {k: p for k, p in m.named_parameters() if p.requires_grad}
        return dict(zip(params, torch.autograd.grad(loss(m), list(params.values()))))

    predicted, worst = gmap.dual_gradient(grads(model)), 0.0
    for key, g in grads(grown).items():
        ok = ~np.isnan(predicted[key])
        if ok.any():
            worst = max(worst, float(np.abs(g.numpy()[ok] - predicted[key][ok]).max() / np.abs(g.numpy()).max()))
    assert worst <= 1e-6  # (the routers compute in float32 even in float64)
    new = graphgrow.grow_optimizer(opt, model, grown, mode="dual")
    loss(grown).backward()
    new.step()
    assert all(torch.isfinite(p).all() for p in grown.parameters())
