"""Helpers the Hugging Face family tests share: token ids, logits, their relative difference, shapes and sizes."""

import torch


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
