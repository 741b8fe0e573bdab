"""Per-head additive biases joining attention scores (T5's relative position bias, a zero bias of a literal head
count as in T5's cross-attention): the bias's head axis follows the head copies (the embedding table's columns
are units of the heads' space, tied to the scores' head channels), so the heads grow and stay exact."""

import torch
import torch.nn as nn

from helpers import widen_and_compare

EXACT = 1e-10  # float64


class RelativeBiasAttention(nn.Module):
    """Self-attention whose scores get one learned bias per (head, bucket of i - j), shared by every layer (as T5
    computes it once and adds it in each layer), plus an all-zero bias of shape (1, heads, q, k)."""

    def __init__(self, width=16, heads=4, head_dim=4, buckets=8, layers=2, seq=6):
        super().__init__()
        self.heads, self.head_dim, self.seq = heads, head_dim, seq
        self.embed = nn.Embedding(32, width)
        self.bias = nn.Embedding(buckets, heads)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * heads * head_dim, bias=False) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, width, bias=False) for _ in range(layers))
        self.head = nn.Linear(width, 5)
        pos = torch.arange(seq)
        self.register_buffer("buckets", (pos[None, :] - pos[:, None]).clamp(-3, 4) + 3, persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, _ = x.shape
        bias = self.bias(self.buckets).permute(2, 0, 1).unsqueeze(0)  # (1, heads, q, k)
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) + bias
            scores = scores + torch.zeros(1, self.heads, self.seq, self.seq, dtype=scores.dtype)
            att = scores.softmax(-1) @ v
            x = x + out(att.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        return self.head(x)


def test_relative_bias_heads_follow_the_head_copies():
    torch.manual_seed(0)
    model = RelativeBiasAttention()
    ids = torch.randint(0, 32, (2, 6))
    wide, rep, err = widen_and_compare(model, (ids,), factor=2)
    assert err < EXACT
    assert wide.bias.weight.shape == (8, 8)  # buckets kept, heads doubled
    old = model.bias.weight
    source = [next(j for j in range(4) if torch.equal(wide.bias.weight[:, i], old[:, j])) for i in range(8)]
    assert sorted(set(source)) == [0, 1, 2, 3]
    assert wide.get_submodule("qkv.0").weight.shape[0] == 96  # 8 heads of q, k and v
    assert [sp.new_width for sp in rep.spaces if sp.name == "bias"] == [8]


class TableBiasAttention(nn.Module):
    """BEiT's relative position bias: a parameter table [distances, heads] whose rows are sliced, concatenated and
    gathered by a buffer of constant indices, then laid out (1, heads, q, k) as the attention mask of
    F.scaled_dot_product_attention, shared by every layer (Data2Vec-vision) or one per layer (BEiT)."""

    def __init__(self, width=16, heads=4, head_dim=4, seq=6, layers=2, shared=False):
        super().__init__()
        self.heads, self.head_dim, self.seq, self.shared = heads, head_dim, seq, shared
        self.embed = nn.Embedding(32, width)
        n_tables = 1 if shared else layers
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(2 * seq - 1 + 2, heads)) for _ in range(n_tables))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * heads * head_dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, width) for _ in range(layers))
        self.head = nn.Linear(width, 5)
        pos = torch.arange(seq)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + seq - 1).reshape(-1), persistent=False)

    def bias(self, table):
        rows = torch.cat([table[: 2 * self.seq - 1], table[2 * self.seq - 1:]])  # (sliced as BEiT's cls rows)
        return rows[self.index].view(self.seq, self.seq, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, _ = x.shape
        shared = self.bias(self.tables[0]) if self.shared else None
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            mask = shared if self.shared else self.bias(self.tables[i])
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + out(att.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        return self.head(x)


def test_a_table_gathered_into_an_sdpa_mask_follows_the_head_copies():
    for shared in (False, True):
        torch.manual_seed(0)
        model = TableBiasAttention(shared=shared)
        ids = torch.randint(0, 32, (2, 6))
        wide, rep, err = widen_and_compare(model, (ids,), factor=2)
        assert err < EXACT
        for i, old in enumerate(model.tables):
            new = getattr(wide.tables, str(i))
            assert new.shape == (13, 8)  # rows kept, heads doubled
            source = [next(j for j in range(4) if torch.equal(new[:, i], old[:, j].to(new.dtype)))
                      for i in range(8)]
            assert sorted(set(source)) == [0, 1, 2, 3]
        assert getattr(wide.qkv, "0").weight.shape == (96, 32)
        assert [s.name for s in rep.spaces if s.frozen_reasons] == ["head"], rep.summary()


class AlibiAttention(nn.Module):
    """Pre-norm attention with ALiBi: a fixed slope per head times the key's distance, added to the scaled
    scores (a literal 1/sqrt(head_dim), as a traced model holds it)."""

    def __init__(self, width=16, heads=4, layers=2, seq=6):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.embed = nn.Embedding(32, width)
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 5)
        pos = torch.arange(seq)
        slopes = 2.0 ** -torch.arange(1, heads + 1)
        self.register_buffer("alibi", (slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])).float(),
                             persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, _ = x.shape
        for norm, qkv, out in zip(self.norm, self.qkv, self.out):
            q, k, v = qkv(norm(x)).view(b, n, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
            scores = (q @ k.transpose(-1, -2)) * 0.5 + self.alibi
            att = scores.softmax(-1) @ v
            x = x + out(att.transpose(1, 2).reshape(b, n, -1))
        return self.head(x)


def test_alibi_heads_keep_their_number_and_grow_head_dim():
    torch.manual_seed(0)
    model = AlibiAttention()
    ids = torch.randint(0, 32, (2, 6))
    for factor, width in ((2, 32), (1.5, 24)):
        wide, rep, err = widen_and_compare(model, (ids,), factor=factor)
        assert err < EXACT
        qkv = wide.get_submodule("qkv.0")
        assert qkv.weight.shape == (3 * width, width)  # 4 heads of width / 4 channels each
        assert any("heads keep their number and grow head_dim (ALiBi" in n for n in rep.notes)
        # the scale literal stays: the c copies of a key channel are that channel divided by c (and the stream's
        # columns are split among their copies), so each head's key rows sum to the original head's
        old_w, new_w = model.qkv[0].weight.detach(), qkv.weight.detach()
        assert torch.allclose(new_w.reshape(4, 3, -1).sum(-1)[:, 1], old_w.reshape(4, 3, -1).sum(-1)[:, 1])
        old_b, new_b = model.qkv[0].bias.detach(), qkv.bias.detach()
        assert torch.allclose(new_b.reshape(4, 3, -1).sum(-1)[:, 1], old_b.reshape(4, 3, -1).sum(-1)[:, 1])
