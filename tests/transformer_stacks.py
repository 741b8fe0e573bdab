"""Random transformer stacks for the tests: every option a relation of docs/maths.md §5 depends on.

``Stack(**options)`` is a token model (embedding in, logits out) built from:

* ``norm``: "layer" (nn.LayerNorm), "rms" (nn.RMSNorm), "rms_written" (``w * x * rsqrt(mean(x**2) + eps)``),
  "layer_written" (mean / variance written out with ``mean``);
* ``post``: post-norm (BERT: ``norm(x + f(x))``) instead of pre-norm;
* ``attention``: "sdpa", "matmul" (explicit ``softmax(q @ k^T * s) @ v``), "mha" (nn.MultiheadAttention, no GQA);
* ``heads`` / ``kv_heads`` (GQA through ``repeat_kv``), ``head_dim``, ``rotary``, ``qk_norm`` (per-head RMSNorm);
* ``mlp``: "gelu", "swiglu" or "moe" (dense mixture of SwiGLU experts, ``top_k`` gates kept);
* ``tie``: output head tied to the embedding; ``embed_scale``: Gemma's sqrt(hidden) embedding scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WrittenRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class WrittenLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-0.5, 0.5))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


def make_norm(kind, dim):
    if kind == "layer":
        m = nn.LayerNorm(dim)
    elif kind == "rms":
        m = nn.RMSNorm(dim, eps=1e-6)
    elif kind == "rms_written":
        return WrittenRMSNorm(dim)
    elif kind == "layer_written":
        return WrittenLayerNorm(dim)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    return m


def rotate(q):
    half = q.shape[-1] // 2
    pos = torch.arange(q.shape[2], device=q.device).to(q.dtype)
    inv = 1.0 / (100.0 ** (torch.arange(0, half, device=q.device).to(q.dtype) / half))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * emb.cos() + rot * emb.sin()


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim, kind, rotary, qk_norm):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.kind, self.rotary = heads, kv_heads, head_dim, kind, rotary
        if kind == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
            return
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.q_norm = make_norm("rms", head_dim) if qk_norm else None
        self.k_norm = make_norm("rms", head_dim) if qk_norm else None

    def forward(self, x):
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim)
        k = self.k(x).view(b, t, -1, self.head_dim)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rotary:
            q, k = rotate(q), rotate(k)
        g = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(b, k.shape[1], g, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        v = v[:, :, None].expand(b, v.shape[1], g, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MoE(nn.Module):
    """Dense mixture of experts: a router reads the stream, every expert is an MLP, outputs mixed by the gates."""

    def __init__(self, dim, hidden, experts=3, top_k=None):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(MLP(dim, hidden, "swiglu") for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        gates = self.router(x).softmax(-1)
        if self.top_k is not None:  # keep the top-k gates (sparse routing written densely)
            kth = gates.topk(self.top_k, dim=-1).values[..., -1:]
            gates = gates * (gates >= kth)
        out = torch.stack([e(x) for e in self.experts], dim=-2)  # (..., experts, dim)
        return (gates.unsqueeze(-1) * out).sum(-2)


class MLP(nn.Module):
    def __init__(self, dim, hidden, kind):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if kind == "swiglu" else None
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, dim, o):
        super().__init__()
        self.post = o["post"]
        self.n1, self.n2 = make_norm(o["norm"], dim), make_norm(o["norm"], dim)
        self.attn = Attention(dim, o["heads"], o["kv_heads"], o["head_dim"], o["attention"], o["rotary"],
                              o["qk_norm"])
        self.mlp = MoE(dim, o["hidden"], top_k=o.get("top_k")) if o["mlp"] == "moe" else MLP(dim, o["hidden"], o["mlp"])

    def forward(self, x):
        if self.post:
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


DEFAULTS = dict(vocab=50, heads=4, kv_heads=4, head_dim=8, hidden=40, layers=2, norm="layer", post=False,
                attention="sdpa", rotary=False, qk_norm=False, mlp="gelu", tie=False)


class Stack(nn.Module):
    def __init__(self, **options):
        super().__init__()
        o = {**DEFAULTS, **options}
        dim = o.get("dim", o["heads"] * o["head_dim"])
        self.embed = nn.Embedding(o["vocab"], dim)
        self.blocks = nn.ModuleList(Block(dim, o) for _ in range(o["layers"]))
        self.norm = make_norm(o["norm"], dim) if not o["post"] else nn.Identity()
        self.head = nn.Linear(dim, o["vocab"], bias=False)
        self.embed_scale = dim ** 0.5 if o.get("embed_scale") else None
        if o["tie"]:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.embed_scale is not None:  # Gemma: embeddings times sqrt(hidden size), a literal in the graph
            x = x * self.embed_scale
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def tokens(vocab=50, batch=2, length=7, seed=0):
    return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)),)
