"""Streamed upcycling and expert-count growth of checkpoint directories (graphgrow.hf.upcycle_stream, the
``graphgrow upcycle DIR`` / ``grow-experts DIR`` commands): the written twin equals the in-memory result saved
with save_pretrained, bit for bit, in float32, bfloat16 and float64, sharded and single-file, for 11 family pairs
and random tiny Llama configs; its logits; 2 writer processes and a local Ray cluster write the same bytes; the
layer-by-layer check runs every routed expert and catches one corrupted expert; refusals exit 2 with nothing
written."""

import filecmp
import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.cli import main  # noqa: E402
from graphgrow.errors import VerificationError  # noqa: E402
from graphgrow.hf import upcycle_stream  # noqa: E402
from graphgrow.hf.upcycle_stream import grow_experts_checkpoint, upcycle_checkpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_testing import (DENSE_BASE, DENSE_FAMILIES, DENSE_TWINS, DENSE_VOCAB, logits, max_rel, start_ray,  # noqa: E402
                        token_ids)

VOCAB, BASE = DENSE_VOCAB, DENSE_BASE
GRANITE = dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.3)
# (dense class, its config fields, upcycle options)
CASES = {
    "llama": ("LlamaForCausalLM", {}, {}),
    "qwen2-shared-dense": ("Qwen2ForCausalLM", {}, dict(shared="dense")),
    "qwen2-shared-routed": ("Qwen2ForCausalLM", {}, dict(shared="routed")),
    "qwen3-random": ("Qwen3ForCausalLM", dict(head_dim=16), dict(router="random",
                                                                 moe_config={"norm_topk_prob": True})),
    "granite": ("GraniteForCausalLM", GRANITE, {}),
}
TWIN = {"llama": "MixtralForCausalLM", "qwen2-shared-dense": "Qwen2MoeForCausalLM",
        "qwen2-shared-routed": "Qwen2MoeForCausalLM", "qwen3-random": "Qwen3MoeForCausalLM",
        "granite": "GraniteMoeForCausalLM"}


def _saved(folder, cls_name, kwargs, dtype, shard=None, seed=0):
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**{**BASE, **kwargs})).to(dtype).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def _load(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cls = getattr(transformers, json.load(f)["architectures"][0])
    return cls.from_pretrained(folder, dtype="auto").eval()


def _same_state(a, b) -> list:
    """Keys whose tensors differ (dtype or any bit) between two models' state_dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]


def _against_in_memory(tmp_path, src, out, grow, expect_cls):
    """The streamed output ``out`` against ``grow(from_pretrained(src))`` saved with save_pretrained: every tensor
    bit-identical once loaded, the twin class, the logits; returns the in-memory model's max rel vs the source."""
    dense = _load(src)
    mem = grow(dense)
    mem.save_pretrained(tmp_path / "mem")
    streamed, saved = _load(out), _load(tmp_path / "mem")
    assert type(streamed).__name__ == expect_cls
    assert _same_state(saved, streamed) == []
    x = token_ids(VOCAB)
    assert torch.equal(logits(saved, x), logits(streamed, x))
    # (the in-memory model may run another experts kernel, and keeps rotary tables it built at the model's dtype
    # where from_pretrained keeps them in float32: equal within the dtype's rounding)
    bf16 = next(streamed.parameters()).dtype == torch.bfloat16
    assert max_rel(logits(mem.float(), x), logits(streamed.float(), x)) <= (1e-2 if bf16 else 1e-5)
    return max_rel(logits(dense.float(), x), logits(streamed.float(), x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_streamed_upcycle_equals_in_memory(tmp_path, name, dtype):
    cls_name, kwargs, opts = CASES[name]
    shard = "20KB" if (dtype == torch.bfloat16) == (name in ("llama", "granite")) else None
    src = _saved(tmp_path / "src", cls_name, kwargs, dtype, shard)
    result = upcycle_checkpoint(src, tmp_path / "out", 4, 2, **opts)
    assert result["check"]["check"] == "layers" and result["check"]["max_rel"] <= (1e-5 if dtype == torch.float32
                                                                                   else 1e-2)
    assert result["check"]["experts_run"] == result["check"]["experts_total"] == 2 * 4  # (every expert ran)
    rep = result["report"]
    assert rep.target == TWIN[name] and rep.experts == 4 and rep.top_k == 2 and rep.params_after > rep.params_before
    sharded = os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert sharded == (shard is not None)
    rel = _against_in_memory(tmp_path, src, tmp_path / "out",
                             lambda m: graphgrow.upcycle(m, 4, 2, **opts), TWIN[name])
    assert rel <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_grow_experts_equals_in_memory(tmp_path, dtype):
    src = _saved(tmp_path / "src", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), dtype,
                 "30KB" if dtype == torch.bfloat16 else None)
    result = grow_experts_checkpoint(src, tmp_path / "out", 2)
    assert result["report"].experts == 8 and result["report"].top_k == 4
    assert result["check"]["max_rel"] <= 1e-5
    rel = _against_in_memory(tmp_path, src, tmp_path / "out", lambda m: graphgrow.grow_experts(m, 2),
                             "MixtralForCausalLM")
    assert rel <= 1e-5
    grown = _load(tmp_path / "out")
    assert grown.config.num_local_experts == 8 and grown.config.num_experts_per_tok == 4


def test_two_workers_write_the_same_bytes_and_full_check(tmp_path):
    src = _saved(tmp_path / "src", "Qwen2ForCausalLM", {}, torch.bfloat16, "20KB")
    upcycle_checkpoint(src, tmp_path / "serial", 4, 2, shared="dense", workers=1)
    res = upcycle_checkpoint(src, tmp_path / "two", 4, 2, shared="dense", workers=2, check="full")
    assert res["check"]["check"] == "full" and res["check"]["max_rel"] <= 1e-2
    files = sorted(os.listdir(tmp_path / "serial"))
    assert files == sorted(os.listdir(tmp_path / "two")) and len(files) > 3
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "serial", tmp_path / "two", files, shallow=False)
    assert mismatch == [] and errors == []


def test_layers_subset_and_tied_embeddings(tmp_path):
    src = _saved(tmp_path / "src", "Qwen3ForCausalLM", dict(head_dim=16, num_hidden_layers=4, tie_word_embeddings=True),
                 torch.float32)
    res = upcycle_checkpoint(src, tmp_path / "out", 4, 2, layers=[1, 3])
    # the one-layer skeletons keep each layer's kind (sparse by decoder_sparse_step / mlp_only_layers): the layer
    # check runs and agrees (it reported 5.9e-2 before skeleton_config re-indexed those rules)
    assert res["check"]["check"] == "layers" and res["check"]["max_rel"] <= 1e-5, res["check"]
    out = _load(tmp_path / "out")
    assert out.config.decoder_sparse_step == 2 and out.lm_head.weight is out.model.embed_tokens.weight
    rel = _against_in_memory(tmp_path, src, tmp_path / "out", lambda m: graphgrow.upcycle(m, 4, 2, layers=[1, 3]),
                             "Qwen3MoeForCausalLM")
    assert rel <= 1e-5


def test_cli_exit_codes(tmp_path, capsys, monkeypatch):
    src = _saved(tmp_path / "src", "LlamaForCausalLM", {}, torch.float32)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "2", "--workers", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM -> MixtralForCausalLM" in text and "layer by layer" in text
    assert (out / "tokenizer_config.json").exists()
    # the output exists: exit 2, nothing touched
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "2", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # top-k > experts
    assert main(["upcycle", str(src), "--experts", "2", "--top-k", "3", "-o", str(tmp_path / "x")]) == 2
    assert "cannot exceed" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # no MoE twin
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         n_positions=64)).save_pretrained(gpt2)
    assert main(["upcycle", str(gpt2), "--experts", "4", "-o", str(tmp_path / "y")]) == 2
    assert "twin" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # inexact noise: refused with the check, written without it (labelled)
    assert main(["upcycle", str(src), "--experts", "4", "--noise", "0.1", "-o", str(tmp_path / "n")]) == 2
    assert "--no-check" in capsys.readouterr().err
    assert main(["upcycle", str(src), "--experts", "4", "--noise", "0.1", "--no-check", "-o", str(tmp_path / "n")]) == 0
    assert "NOT function-preserving" in capsys.readouterr().out
    # grow-experts of the written twin, top-k raised
    assert main(["grow-experts", str(out), "--factor", "2", "-o", str(tmp_path / "e")]) == 0
    assert _load(tmp_path / "e").config.num_local_experts == 8
    # a corrupted written tensor: the check fails, exit 1, nothing in place
    compute = upcycle_stream._MoEStream.compute

    def corrupted(self, name, tensor):
        out = compute(self, name, tensor)
        for key, t in out.items():
            if key.endswith(".w2.weight"):  # (every expert: the zero router picks any two)
                t = t.clone()
                t.view(-1)[0] += 1.0
                out[key] = t
        return out

    monkeypatch.setattr(upcycle_stream._MoEStream, "compute", corrupted)
    assert main(["upcycle", str(src), "--experts", "4", "--top-k", "2", "--workers", "1", "-o",
                 str(tmp_path / "bad")]) == 1
    assert "not equivalent" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".graphgrow-")] == []


# --- more pairs, float64, a layer subset of ERNIE, one corrupted expert, bf16 random routers, Ray

# the pairs beyond CASES, with random routers (FlexOlmo renormalises its top-k only when told to)
MORE = {"ernie4_5": {}, "hunyuan": {}, "cohere2": {}, "qwen3_5": {}, "olmo2": dict(moe_config={"norm_topk_prob": True}),
        "lfm2": {}}


@pytest.mark.parametrize("name", list(MORE))
def test_more_pairs_streamed_equal_in_memory(tmp_path, name):
    cls_name, kwargs = DENSE_FAMILIES[name]
    src = _saved(tmp_path / "src", cls_name, kwargs, torch.float32)
    opts = dict(router="random", **MORE[name])
    result = upcycle_checkpoint(src, tmp_path / "out", 4, 2, **opts)
    check = result["check"]
    assert check["check"] == "layers" and check["max_rel"] <= 1e-5, check
    assert check["experts_run"] == check["experts_total"] == 4 * len(result["report"].sparse_layers)
    rel = _against_in_memory(tmp_path, src, tmp_path / "out", lambda m: graphgrow.upcycle(m, 4, 2, **opts),
                             DENSE_TWINS[name])
    assert rel <= 1e-5


def test_float64_streamed_equals_in_memory(tmp_path):
    src = _saved(tmp_path / "src", "Qwen3ForCausalLM", dict(head_dim=16), torch.float64, "40KB")
    result = upcycle_checkpoint(src, tmp_path / "out", 6, 2)  # (E/k = 3: routed down-projections x 3)
    check = result["check"]
    assert check["checked_dtype"] == "torch.float64" and check["max_rel"] <= 1e-10, check
    dense = _load(src)
    streamed = transformers.Qwen3MoeForCausalLM.from_pretrained(  # (grouped_mm has no float64)
        tmp_path / "out", dtype="auto", experts_implementation="eager")
    assert next(streamed.parameters()).dtype == torch.float64
    mem = graphgrow.upcycle(dense, 6, 2)
    assert _same_state(mem, streamed) == []  # bit for bit
    x = token_ids(VOCAB)
    assert max_rel(logits(dense, x), logits(streamed, x)) <= 1e-10
    # random router rows: Qwen3-MoE computes its router's softmax in float32 even in float64, so the renormalised
    # weights carry float32 rounding (~1e-7), inside the float64 tolerance (1e-6), as in memory
    random = upcycle_checkpoint(src, tmp_path / "random", 6, 2, router="random", moe_config={"norm_topk_prob": True})
    assert random["check"]["max_rel"] <= 1e-6, random["check"]


def test_ernie_layer_subset_is_checked_layer_by_layer(tmp_path):
    src = _saved(tmp_path / "src", "Ernie4_5ForCausalLM", dict(num_hidden_layers=4), torch.float32)
    res = upcycle_checkpoint(src, tmp_path / "out", 4, 2, layers=[1, 3])
    # the one-layer skeletons restate moe_layer_start_index / end / interval for their layer (sparse or dense)
    check = res["check"]
    assert check["check"] == "layers" and "note" not in check and check["max_rel"] <= 1e-5, check
    assert check["experts_total"] == 2 * 4 == check["experts_run"]
    out = _load(tmp_path / "out")
    cfg = out.config
    assert (cfg.moe_layer_start_index, cfg.moe_layer_end_index, cfg.moe_layer_interval) == (1, 3, 2)
    kinds = [type(layer.mlp).__name__ for layer in out.model.layers]
    assert kinds == ["Ernie4_5_MoeMLP", "Ernie4_5_MoeSparseMoeBlock"] * 2
    rel = _against_in_memory(tmp_path, src, tmp_path / "out", lambda m: graphgrow.upcycle(m, 4, 2, layers=[1, 3]),
                             "Ernie4_5_MoeForCausalLM")
    assert rel <= 1e-5


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("llama") / "src", "LlamaForCausalLM", {}, torch.float32)


@pytest.mark.parametrize("expert", range(4))
def test_one_corrupted_expert_is_caught(llama_src, tmp_path, monkeypatch, expert):
    """One weight of one expert of layer 1: a zero router ties every expert and the family picks the same two for
    every token, so two of the four never run under the routing; the check runs the others by rotating the copied
    experts' slots, and each corruption fails it (exit 1, nothing in place)."""
    compute = upcycle_stream._MoEStream.compute
    target = f"model.layers.1.block_sparse_moe.experts.{expert}.w2.weight"

    def corrupted(self, name, tensor):
        out = compute(self, name, tensor)
        if target in out:
            t = out[target].clone()
            t.view(-1)[5] += 1.0
            out[target] = t
        return out

    monkeypatch.setattr(upcycle_stream._MoEStream, "compute", corrupted)
    with pytest.raises(VerificationError, match="not equivalent"):
        upcycle_checkpoint(llama_src, tmp_path / "bad", 4, 2, workers=1)
    assert os.listdir(tmp_path) == []


def test_copies_the_routing_leaves_idle_are_run(llama_src, tmp_path, monkeypatch):
    """The family's routing runs two of the four experts of each layer (a zero router ties them); the rotations run
    the other two.  Where the family's experts code reads the stack other than one expert at a time the layer is
    run with the stack loaded whole."""
    from graphgrow.hf import layer_check

    ran = {}
    run = layer_check._Chain._rotate_experts

    def counting(self, model, *args):
        stacks = layer_check.per_expert_stacks(model)
        if stacks:
            ran.setdefault("used", []).append(sorted(set().union(*(s.used for s in stacks))))
        return run(self, model, *args)

    monkeypatch.setattr(layer_check._Chain, "_rotate_experts", counting)
    res = upcycle_checkpoint(llama_src, tmp_path / "out", 4, 2)["check"]
    assert res["experts_run"] == res["experts_total"] == 8 and res["rotated_max_rel"] == 0.0
    assert len(ran["used"]) == 2 and all(len(u) == 2 for u in ran["used"])  # (the same two for every token)

    def whole(self, index):
        raise layer_check._NeedsWhole("indexed by a tensor")

    monkeypatch.setattr(layer_check._PerExpert, "__getitem__", whole)
    res = upcycle_checkpoint(llama_src, tmp_path / "whole", 4, 2)["check"]
    assert res["check"] == "layers" and res["max_rel"] <= 1e-5 and "experts_total" not in res


def test_bf16_random_router_in_memory_and_streamed_agree(tmp_path):
    """A renormalising family's random router rows are exact: decided in float32 (upcycle.router_dtype), where the
    chosen weights sum to 1 within 1e-7; the bf16 model's own forward rounds them to bf16 (the sum misses 1 by
    <= 2 x 2^-9), within the bf16 tolerance.  Both paths accept and write the same bytes."""
    from graphgrow.hf.upcycle import router_dtype

    assert router_dtype(torch.bfloat16) == torch.float32 and router_dtype(torch.float64) == torch.float64
    src = _saved(tmp_path / "src", "LlamaForCausalLM", {}, torch.bfloat16)
    dense = _load(src)
    mem = graphgrow.upcycle(dense, 8, 2, router="random")
    assert mem.graphgrow_report.check.passed
    x = token_ids(VOCAB)
    bf16_rel = max_rel(logits(dense, x).float(), logits(mem, x).float())  # the family's own bf16 arithmetic
    assert bf16_rel <= 3e-2
    res = upcycle_checkpoint(src, tmp_path / "out", 8, 2, router="random")
    assert res["check"]["max_rel"] <= 1e-2
    mem.save_pretrained(tmp_path / "mem")
    assert _same_state(_load(tmp_path / "mem"), _load(tmp_path / "out")) == []


def _digests(folder) -> dict:
    import hashlib

    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))}


def test_ray_local_cluster_writes_the_serial_bytes(tmp_path, capsys):
    ray = start_ray(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        src = _saved(tmp_path / "src", "Qwen2ForCausalLM", {}, torch.bfloat16, "20KB")
        args = ["upcycle", str(src), "--experts", "4", "--top-k", "2"]
        assert main(args + ["--workers", "1", "-o", str(tmp_path / "serial")]) == 0
        assert main(args + ["--ray", "auto", "-o", str(tmp_path / "ray")]) == 0
        assert "layer by layer" in capsys.readouterr().out
        digests = _digests(tmp_path / "ray")
        assert digests == _digests(tmp_path / "serial") and len(digests) > 3
    finally:
        ray.shutdown()


def _draw_llama(rng) -> tuple:
    """A tiny dense Llama config and upcycle options drawn from ``rng``."""
    heads = int(rng.choice([1, 2, 4]))
    kv = int(rng.choice([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = int(rng.choice([4, 8, 16]))
    experts = int(rng.integers(2, 9))
    cfg = dict(vocab_size=int(rng.integers(40, 120)), hidden_size=heads * head_dim, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=head_dim, intermediate_size=int(rng.integers(4, 80)),
               num_hidden_layers=int(rng.integers(1, 4)), max_position_embeddings=32, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=bool(rng.integers(0, 2)))
    opts = dict(experts=experts, top_k=int(rng.integers(1, experts + 1)), router=str(rng.choice(["zero", "random"])),
                seed=int(rng.integers(0, 1000)))
    return cfg, opts


@pytest.mark.parametrize("draw", range(6))
def test_random_llama_configs_upcycle_exactly(tmp_path, draw):
    """Property: any tiny dense Llama (hidden, MLP width, heads, kv heads, layers, tied or not) upcycled to any E
    experts and top-k, zero or random routers, is exact in memory and streamed, and both give the same tensors."""
    import numpy as np

    cfg, opts = _draw_llama(np.random.default_rng(1000 + draw))
    torch.manual_seed(draw)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    dense.save_pretrained(tmp_path / "src")
    mem = graphgrow.upcycle(dense, **opts)
    x = token_ids(cfg["vocab_size"], seed=draw)
    assert max_rel(logits(dense, x), logits(mem, x)) <= 1e-5, (cfg, opts)
    res = upcycle_checkpoint(tmp_path / "src", tmp_path / "out", opts["experts"], opts["top_k"], router=opts["router"],
                             seed=opts["seed"])
    check = res["check"]
    assert check["max_rel"] <= 1e-5 and check["experts_run"] == check["experts_total"], (cfg, opts, check)
    streamed = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager")
    assert _same_state(mem, streamed) == [], (cfg, opts)
