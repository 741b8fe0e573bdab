"""Helpers the Hugging Face family tests share: token ids, logits, their relative difference, shapes and sizes."""

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
