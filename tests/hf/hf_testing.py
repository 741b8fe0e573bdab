"""Helpers the Hugging Face family tests share: token ids, logits, their relative difference, shapes and sizes."""

import torch

# the tiny dense decoder the upcycling tests (in memory and streamed) start from
DENSE_VOCAB = 96
DENSE_BASE = dict(vocab_size=DENSE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)


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
