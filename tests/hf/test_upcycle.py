"""graphgrow.upcycle (dense -> mixture of experts) and graphgrow.grow_experts (E -> m*E experts) on tiny random
transformers models: the twin class, its config, bit-identical non-MLP tensors, tied embeddings, logits in
float32 and float64, greedy generation, save/load, the per-tensor pieces a streamed writer replays, refusals.

Float64 figures: the routers of Mixtral, Qwen*-MoE, FlexOlmo, Cohere2-MoE and GraniteMoE compute their softmax in
float32 even in a float64 model, so a construction whose weights the router computes (random rows, expert
copies sharing p/m) carries float32 rounding (~1e-7) into float64 logits; zero routers (and shared experts with
zero routed outputs) do not, and sit at <= 1e-10.
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.core.moe import apply_piece  # noqa: E402
from graphgrow.errors import InvalidArgumentError, UnsupportedModelError  # noqa: E402
from graphgrow.hf.upcycle import plan_grow_experts, plan_upcycle  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_testing import (DENSE_BASE, DENSE_FAMILIES, DENSE_TWINS, DENSE_VOCAB, logits, max_rel,  # noqa: E402
                        n_params, token_ids)

VOCAB, BASE = DENSE_VOCAB, DENSE_BASE
DENSE, TWIN = DENSE_FAMILIES, DENSE_TWINS
MOE = {
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64)),
    "phimoe": ("PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ROUTER_F64 = 1e-6  # float64 models whose routers compute their weights in float32 (module docstring)


def _build(cls_name, kwargs, dtype=torch.float32, seed=0):
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**BASE, **kwargs})
    cfg._attn_implementation = "sdpa"
    if dtype == torch.float64:
        cfg._experts_implementation = "eager"  # (transformers' grouped_mm kernel has no float64)
    torch.manual_seed(seed)
    return cls(cfg).to(dtype).eval()


def dense(name, dtype=torch.float32, **extra):
    cls_name, kwargs = DENSE[name]
    return _build(cls_name, {**kwargs, **extra}, dtype)


def moe(name, dtype=torch.float32):
    cls_name, kwargs = MOE[name]
    return _build(cls_name, kwargs, dtype)


def rel(a, b, dtype=None, seed=1):
    x = token_ids(VOCAB, seed)
    return max_rel(logits(a, x), logits(b, x))


def assert_non_mlp_identical(model, result):
    new = result.state_dict()
    for key, value in model.state_dict().items():
        if ".mlp." not in key and ".feed_forward." not in key:
            assert torch.equal(new[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(DENSE))
def test_every_pair_zero_router_exact(name, dtype):
    model = dense(name, dtype)
    result = graphgrow.upcycle(model, experts=4, top_k=2)
    rep = result.graphgrow_report
    assert type(result).__name__ == TWIN[name] and rep.function_preserving
    assert rel(model, result) <= TOL[dtype]
    assert rep.check.passed and rep.params_before == n_params(model) and rep.params_after == n_params(result)
    assert_non_mlp_identical(model, result)
    cfg = result.config
    assert cfg.num_experts_per_tok == 2
    assert getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", None)) == 4
    experts = next(v for k, v in result.state_dict().items() if k.startswith("model.layers.1.")
                   and k.endswith("experts.gate_up_proj"))
    width = next(v.shape[1] for k, v in model.state_dict().items() if k.startswith("model.layers.1.")
                 and k.endswith(("down_proj.weight", "w2.weight")))
    assert tuple(experts.shape) == (4, 2 * width, 32)
    assert rep.sparse_layers == [0, 1]


def test_mixtral_params_and_copies():
    model = dense("llama")
    result = graphgrow.upcycle(model, experts=8, top_k=2)
    mlp = 3 * 32 * 64
    # per layer: 8 expert copies replace the dense MLP, plus an 8 x 32 router
    assert n_params(result) == n_params(model) + 2 * (7 * mlp + 8 * 32)
    sd, src = result.state_dict(), model.state_dict()
    gate_up = torch.cat([src["model.layers.0.mlp.gate_proj.weight"], src["model.layers.0.mlp.up_proj.weight"]])
    for e in range(8):
        assert torch.equal(sd["model.layers.0.mlp.experts.gate_up_proj"][e], gate_up)
        assert torch.equal(sd["model.layers.0.mlp.experts.down_proj"][e], src["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(sd["model.layers.0.mlp.gate.weight"], torch.zeros(8, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_unnormalised_topk_scaled_by_e_over_k(dtype):
    # Qwen3-MoE (norm_topk_prob=False): a zero router gives each chosen expert 1/E, the k chosen sum to k/E
    model = dense("qwen3", dtype)
    result = graphgrow.upcycle(model, experts=8, top_k=2)
    assert result.graphgrow_report.down_scale == pytest.approx(4.0, rel=1e-6)
    assert rel(model, result) <= TOL[dtype]
    # experts=6, top_k=3: 1/6 is not a float32 number; the measured sum compensates it exactly
    result = graphgrow.upcycle(model, experts=6, top_k=3)
    assert result.graphgrow_report.down_scale == pytest.approx(2.0, rel=1e-6)
    assert rel(model, result) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,extra", [("llama", {}), ("granite", {}),
                                        ("qwen3", dict(moe_config={"norm_topk_prob": True})),
                                        ("qwen2", {})])  # (qwen2: shared="dense", the routed output is zero)
def test_random_router_exact(name, extra, dtype):
    model = dense(name, dtype)
    result = graphgrow.upcycle(model, experts=4, top_k=2, router="random", seed=3, **extra)
    router = [v for k, v in result.state_dict().items() if k.endswith(("mlp.gate.weight", "router.weight"))][0]
    assert float(router.abs().max()) > 0 and float(router.std()) < 0.1  # small random rows
    assert rel(model, result) <= (TOL[dtype] if dtype == torch.float32 or name == "qwen2" else ROUTER_F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["qwen2", "granite", "ernie4_5", "hunyuan"])
@pytest.mark.parametrize("shared", ["dense", "routed"])
def test_shared_expert_variants(name, shared, dtype):
    model = dense(name, dtype)
    result = graphgrow.upcycle(model, experts=4, top_k=2, shared=shared)
    sd, src = result.state_dict(), model.state_dict()
    assert rel(model, result) <= TOL[dtype]
    if name == "qwen2":
        down = sd["model.layers.0.mlp.shared_expert.down_proj.weight"]
        assert torch.equal(sd["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros_like(
            sd["model.layers.0.mlp.shared_expert_gate.weight"]))
        if shared == "dense":  # sigmoid(0) = 1/2 compensated
            assert torch.equal(down, 2 * src["model.layers.0.mlp.down_proj.weight"])
            assert float(sd["model.layers.0.mlp.experts.down_proj"].abs().max()) == 0
        else:  # Qwen2-MoE does not renormalise: routed down-projections x E/k
            assert float(down.abs().max()) == 0
            assert torch.allclose(sd["model.layers.0.mlp.experts.down_proj"][1],
                                  2 * src["model.layers.0.mlp.down_proj.weight"])
    elif name in ("ernie4_5", "hunyuan"):  # an ungated shared expert: the MLP as it is, or zero
        down = sd["model.layers.0.mlp.shared_" + ("experts" if name == "ernie4_5" else "mlp") + ".down_proj.weight"]
        assert torch.equal(down, src["model.layers.0.mlp.down_proj.weight"]) == (shared == "dense")
    else:
        assert type(result).__name__ == "GraniteMoeSharedForCausalLM"
        out = sd["model.layers.0.shared_mlp.output_linear.weight"]
        assert (float(out.abs().max()) == 0) == (shared == "routed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_layers_subset(dtype):
    model = dense("qwen3", dtype, num_hidden_layers=3)
    result = graphgrow.upcycle(model, experts=4, top_k=2, layers=[0])
    assert result.config.mlp_only_layers == [1, 2] and result.graphgrow_report.sparse_layers == [0]
    assert type(result.model.layers[1].mlp).__name__ == "Qwen3MoeMLP"
    assert type(result.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert rel(model, result) <= TOL[dtype]
    model = dense("qwen2", dtype, num_hidden_layers=4)
    result = graphgrow.upcycle(model, experts=4, top_k=2, layers=[1, 3])  # every 2nd layer: decoder_sparse_step 2
    assert (result.config.decoder_sparse_step, result.config.mlp_only_layers) == (2, [])
    assert rel(model, result) <= TOL[dtype]
    model = dense("cohere2", dtype)
    result = graphgrow.upcycle(model, experts=4, top_k=2, layers=[0])
    assert result.config.mlp_layer_types == ["sparse", "dense"]
    assert rel(model, result) <= TOL[dtype]
    model = dense("ernie4_5", dtype, num_hidden_layers=4)
    result = graphgrow.upcycle(model, experts=4, top_k=2, layers=[1, 3])  # ERNIE: start 1, end 3, every 2nd
    cfg = result.config
    assert (cfg.moe_layer_start_index, cfg.moe_layer_end_index, cfg.moe_layer_interval) == (1, 3, 2)
    assert rel(model, result) <= TOL[dtype]
    with pytest.raises(UnsupportedModelError, match="Ernie4_5_MoeConfig cannot state it grown"):
        graphgrow.upcycle(model, experts=4, top_k=2, layers=[0, 3])
    model = dense("lfm2", dtype, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"])
    result = graphgrow.upcycle(model, experts=4, top_k=2, layers=[1, 2])  # LFM2: the first num_dense_layers dense
    assert result.config.num_dense_layers == 1 and rel(model, result) <= TOL[dtype]
    with pytest.raises(UnsupportedModelError, match="Lfm2MoeConfig cannot state it grown"):
        graphgrow.upcycle(model, experts=4, top_k=2, layers=[0, 2])


def test_tied_embeddings_stay_tied():
    model = dense("llama", tie_word_embeddings=True)
    result = graphgrow.upcycle(model, experts=4, top_k=2)
    assert result.lm_head.weight is result.model.embed_tokens.weight
    assert rel(model, result) <= 1e-5


def test_generate_and_save_load(tmp_path):
    model = dense("qwen2")
    result = graphgrow.upcycle(model, experts=4, top_k=2, router="random")
    x = token_ids(VOCAB, 2, length=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), result.generate(x, **kw))
    result.save_pretrained(tmp_path)
    loaded = type(result).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, x), logits(result, x))
    assert loaded.config.num_experts == 4 and loaded.config.num_experts_per_tok == 2


def test_pieces_replay_bit_identical():
    # what a streamed writer does: plan pieces, read each source from the stored tensors, apply, write
    model = dense("qwen3")
    result = graphgrow.upcycle(model, experts=4, top_k=2, router="random", seed=5, moe_config={"norm_topk_prob": True})
    stored = {k: v.numpy() for k, v in model.state_dict().items()}
    out = result.state_dict()
    for piece in result.graphgrow_pieces:
        value = torch.from_numpy(np.ascontiguousarray(apply_piece(piece, stored.__getitem__))).to(out[piece.key].dtype)
        assert torch.equal(value, out[piece.key]), piece.key
    assert {p.op for p in result.graphgrow_pieces} >= {"copy", "experts", "normal"}
    # a streamed writer plans on the meta device (no weights): the same pieces
    with torch.device("meta"):
        weightless = type(model)(model.config)
    plan = plan_upcycle(weightless, 4, 2, router="random", seed=5, moe_config={"norm_topk_prob": True})
    assert plan.pieces == result.graphgrow_pieces and plan.cls is type(result)
    grown = graphgrow.grow_experts(result, factor=2)
    with torch.device("meta"):
        weightless = type(result)(result.config)
    assert plan_grow_experts(weightless, 2).pieces == grown.graphgrow_pieces


def test_noise_is_labelled_inexact():
    model = dense("llama")
    result = graphgrow.upcycle(model, experts=4, top_k=2, noise=0.01)
    rep = result.graphgrow_report
    assert not rep.function_preserving and rep.deviation is not None and 1e-5 < rep.deviation < 0.1
    assert rel(model, result) == pytest.approx(rel(model, result))  # (deterministic)
    assert "NOT function-preserving" in rep.summary()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_property_random_dense_configs(seed):
    rng = np.random.default_rng(seed)
    heads = int(rng.choice([2, 4]))
    kv = int(rng.choice([h for h in (1, 2, 4) if heads % h == 0]))
    name = ["llama", "qwen3", "qwen2"][seed]
    extra = dict(hidden_size=8 * heads * int(rng.integers(1, 3)), num_attention_heads=heads, num_key_value_heads=kv,
                 intermediate_size=int(rng.integers(8, 80)), num_hidden_layers=int(rng.integers(1, 4)))
    if name == "qwen3":
        extra["head_dim"] = int(rng.choice([8, 16]))
    experts = int(rng.integers(2, 9))
    top_k = int(rng.integers(1, experts + 1))
    model = dense(name, **extra)
    result = graphgrow.upcycle(model, experts=experts, top_k=top_k, router=["zero", "random"][seed % 2],
                               seed=seed)
    assert rel(model, result, seed=seed) <= 1e-5, (extra, experts, top_k)
    assert_non_mlp_identical(model, result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "olmoe", "granitemoe", "qwen2-moe"])
def test_grow_experts_raised_topk_exact(name, dtype):
    model = moe(name, dtype)
    result = graphgrow.grow_experts(model, factor=2)
    cfg, rep = result.config, result.graphgrow_report
    assert cfg.num_experts_per_tok == 4 and rep.experts == 8 and rep.function_preserving
    assert rel(model, result) <= (TOL[dtype] if dtype == torch.float32 else ROUTER_F64)
    key = next(k for k in result.state_dict() if k.endswith("layers.0.mlp.experts.down_proj")
               or k.endswith("layers.0.block_sparse_moe.experts.down_proj"))
    grown, old = result.state_dict()[key], model.state_dict()[key]
    assert grown.shape[0] == 8 and torch.equal(grown[2], old[1]) and torch.equal(grown[3], old[1])


@pytest.mark.parametrize("name", ["mixtral", "phimoe"])
def test_grow_experts_fixed_topk_reports_deviation(name):
    model = moe(name)
    result = graphgrow.grow_experts(model, factor=2, keep_top_k=True)
    rep = result.graphgrow_report
    assert not rep.function_preserving and rep.top_k == 2 and rep.deviation > 1e-3
    assert "NOT function-preserving" in rep.summary()


def test_refusals():
    with pytest.raises(UnsupportedModelError, match="no exact mixture-of-experts twin.*LayerNorm.*Mixtral"):
        graphgrow.upcycle(_build("Phi3ForCausalLM", {}), experts=4, top_k=2)
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts twin.*Llama -> Mixtral"):
        graphgrow.upcycle(_build("GemmaForCausalLM", dict(head_dim=8)), experts=4, top_k=2)
    model = dense("llama")
    with pytest.raises(InvalidArgumentError, match="top_k \\(5\\) cannot exceed the number of experts \\(4\\)"):
        graphgrow.upcycle(model, experts=4, top_k=5)
    with pytest.raises(UnsupportedModelError, match="MixtralConfig cannot state it grown"):
        graphgrow.upcycle(model, experts=4, top_k=2, layers=[1])
    with pytest.raises(UnsupportedModelError, match="does not renormalise its top-k weights"):
        graphgrow.upcycle(dense("qwen3"), experts=4, top_k=2, router="random")
    with pytest.raises(UnsupportedModelError, match="FlexOlmoConfig cannot state it grown: it has no layer_types"):
        graphgrow.upcycle(dense("olmo3", layer_types=["sliding_attention", "full_attention"], sliding_window=4),
                          experts=4, top_k=2)
    with pytest.raises(UnsupportedModelError, match="has no shared expert"):
        graphgrow.upcycle(model, experts=4, top_k=2, shared="dense")
    with pytest.raises(UnsupportedModelError, match="exactly 2 experts"):
        graphgrow.grow_experts(moe("phimoe"), factor=2)
    with pytest.raises(UnsupportedModelError, match="not a mixture of experts|expert count"):
        graphgrow.grow_experts(model, factor=2)
    with pytest.raises(InvalidArgumentError):
        graphgrow.upcycle(torch.nn.Linear(2, 2), experts=4, top_k=2)
    with pytest.raises(UnsupportedModelError, match="Qwen3MoeConfig rejects the twin's fields"):
        graphgrow.upcycle(dense("qwen3"), experts=4, top_k=2, moe_config={"norm_topk_prob": "yes"})
    for message in [str(e) for e in _refusal_messages(model)]:
        assert message.count(". ") == 0 and "\n" not in message  # one sentence


def _refusal_messages(model):
    out = []
    for kwargs in (dict(experts=4, top_k=5), dict(experts=4, top_k=2, layers=[1]), dict(experts=0),
                   dict(router="noisy")):
        try:
            graphgrow.upcycle(model, **kwargs)
        except graphgrow.GraphGrowError as exc:
            out.append(exc)
    assert len(out) == 4
    return out


def test_cli_upcycle_and_grow_experts(tmp_path, capsys):
    from graphgrow.cli import main

    model = dense("llama", tie_word_embeddings=True)
    src, out, grown = tmp_path / "dense", tmp_path / "moe", tmp_path / "moe8"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "2", "--router", "random", "-o", str(out)]) == 0
    assert "LlamaForCausalLM -> MixtralForCausalLM" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM" and (out / "tokenizer_config.json").exists()
    assert rel(model, loaded) <= 1e-5 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # the output exists: refused (exit 2) before any work, as widen does
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "2", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["grow-experts", str(out), "--factor", "2", "-o", str(grown)]) == 0
    loaded8 = transformers.AutoModelForCausalLM.from_pretrained(grown).eval()
    assert loaded8.config.num_local_experts == 8 and loaded8.config.num_experts_per_tok == 4
    assert rel(model, loaded8) <= 1e-5
    assert main(["upcycle", str(src), "--experts", "2", "--top-k", "3", "-o", str(tmp_path / "x")]) == 2
    assert "cannot exceed" in capsys.readouterr().err


def test_base_model_and_bfloat16():
    base = _build("LlamaModel", {})
    result = graphgrow.upcycle(base, experts=4, top_k=2)
    x = token_ids(VOCAB, 3)
    with torch.no_grad():
        assert type(result).__name__ == "MixtralModel"
        assert torch.equal(base(x).last_hidden_state, result(x).last_hidden_state)
    model = dense("qwen3").to(torch.bfloat16)
    result = graphgrow.upcycle(model, experts=4, top_k=2)  # E/k = 2: exact in bfloat16 too
    assert result.dtype == torch.bfloat16 and result.graphgrow_report.check.passed
    assert_non_mlp_identical(model, result)
    assert torch.equal(logits(model, x), logits(result, x))


@pytest.mark.parametrize("name,extra", [("ernie4_5", dict(shared="routed")), ("cohere2", {}), ("qwen2", {})])
def test_upcycled_then_grown(name, extra):
    # ERNIE's router holds a per-expert score bias (1, E): repeated with the experts
    model = dense(name)
    up = graphgrow.upcycle(model, experts=4, top_k=2, router="random", **extra)
    grown = graphgrow.grow_experts(up, factor=2)
    assert grown.graphgrow_report.experts == 8 and grown.config.num_experts_per_tok == 4
    assert rel(model, grown) <= 1e-5
    ops = {p.key: p for p in grown.graphgrow_pieces if p.op == "repeat"}
    assert len(ops) >= 3 * model.config.num_hidden_layers
