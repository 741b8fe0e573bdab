"""Helpers the Hugging Face family tests share: token ids, logits, their relative difference, shapes and sizes,
the tensors of a saved directory."""

import os

import torch

# the tiny dense decoder the upcycling tests (in memory and streamed) start from
DENSE_VOCAB = 96
DENSE_BASE = dict(vocab_size=DENSE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
# the dense families with an MoE twin, as the upcycling tests build them: class name, config fields over DENSE_BASE
DENSE_FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16)),
    "granite": ("GraniteForCausalLM", dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                                           attention_multiplier=0.3)),
    "olmo2": ("Olmo2ForCausalLM", {}),
    "cohere2": ("Cohere2ForCausalLM", {}),
    "olmo3": ("Olmo3ForCausalLM", dict(layer_types=["full_attention", "full_attention"])),
    "ernie4_5": ("Ernie4_5ForCausalLM", {}),
    "lfm2": ("Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),  # (MLP width 256, derived)
    "hunyuan": ("HunYuanDenseV1ForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                                  head_dim=8)),
    "qwen3_5": ("Qwen3_5ForCausalLM", dict(layer_types=["linear_attention", "full_attention"], head_dim=8,
                                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                           linear_value_head_dim=8)),
}
DENSE_TWINS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
               "qwen3": "Qwen3MoeForCausalLM", "granite": "GraniteMoeForCausalLM", "olmo2": "FlexOlmoForCausalLM",
               "olmo3": "FlexOlmoForCausalLM", "cohere2": "Cohere2MoeForCausalLM", "qwen3_5": "Qwen3_5MoeForCausalLM",
               "ernie4_5": "Ernie4_5_MoeForCausalLM", "hunyuan": "HunYuanMoEV1ForCausalLM",
               "lfm2": "Lfm2MoeForCausalLM"}

# MoE models of 17 families whose expert count grows (tests/hf/test_grow_rule.py, benchmarks/hf_upcycle_pairs.py):
# class name, config fields over DENSE_BASE
_MLA = dict(num_key_value_heads=4, moe_intermediate_size=32, first_k_dense_replace=0, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8)
_LINEAR = dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
               linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
MOE_FAMILIES = {
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "flexolmo": ("FlexOlmoForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "cohere2-moe": ("Cohere2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "ernie4_5-moe": ("Ernie4_5_MoeForCausalLM", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32)),
    "hunyuan-moe": ("HunYuanMoEV1ForCausalLM", dict(num_experts=4, moe_topk=2, head_dim=8)),
    "lfm2-moe": ("Lfm2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            num_dense_layers=0, layer_types=["conv", "full_attention"])),
    "qwen3-next": ("Qwen3NextForCausalLM", dict(_LINEAR, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_5-moe": ("Qwen3_5MoeForCausalLM", dict(_LINEAR, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "minimax": ("MiniMaxForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                           layer_types=["full_attention", "full_attention"])),
    "llama4": ("Llama4ForCausalLM", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64,
                                         head_dim=8)),
    "dots1": ("Dots1ForCausalLM", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=1)),
    "deepseek-v3": ("DeepseekV3ForCausalLM", dict(_MLA, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                                  topk_group=1)),
    "deepseek-v3 (2 groups)": ("DeepseekV3ForCausalLM", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2,
                                                             n_group=2, topk_group=1)),
    "glm4-moe (2 groups)": ("Glm4MoeForCausalLM", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                                       topk_group=1, moe_intermediate_size=32,
                                                       first_k_dense_replace=0, head_dim=8)),
}


def token_ids(vocab: int, seed: int = 0, length: int = 10):
    """Two rows of token ids past the special ids 0-2, the last vocabulary row among them."""
    x = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    x[0, 0] = vocab - 1
    return x


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def max_rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def logits_rel(a, b, x) -> float:
    """max relative difference of the logits of models ``a`` and ``b`` on ``x``."""
    return max_rel(logits(a, x), logits(b, x))


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def start_ray(*paths: str):
    """``ray.init`` of a 2-CPU local cluster whose workers find ``paths`` on their PYTHONPATH (they import
    graphgrow, or a test module's plans, by name); the caller's PYTHONPATH restored."""
    import os

    import pytest

    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, old) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ray


def saved_tensors(folder) -> dict:
    """Every tensor of the safetensors shards in ``folder`` (a save_pretrained directory), by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def trained_like(model):
    """``model`` (in place) with the tensors of its sparse blocks apart, as training leaves them: routers,
    experts and selection biases (parameters and buffers; a fresh model's biases are zero, where every routing
    rule is exact, and its upcycled experts are copies, which would hide what keeping top-k changes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and any(f".{b}." in name for b in ("mlp", "feed_forward", "block_sparse_moe")):
                std = 0.02 if name.endswith("bias") else 0.1 * float(t.float().std().clamp_min(1e-2))
                t.add_(std * torch.randn(t.shape, generator=g).to(t.dtype))
    return model
