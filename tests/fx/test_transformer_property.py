"""Property test: random transformer stacks (norm kind and placement, attention form, heads and key/value
groups, head_dim, rotary, per-head q/k norms, MLP kind, tied head) at factors 1.41, 1.5, 2, 3 either widen
exactly (float64) or are refused cleanly; a wrong model is never returned."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphgrow
from helpers import widen_and_compare
from transformer_stacks import Stack, tokens


@st.composite
def stacks(draw):
    attention = draw(st.sampled_from(["sdpa", "matmul", "mha"]))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2])) if attention != "mha" else draw(st.sampled_from([2, 4]))
    options = dict(
        norm=draw(st.sampled_from(["layer", "rms", "rms_written", "layer_written"])),
        post=draw(st.booleans()),
        attention=attention,
        heads=heads,
        kv_heads=kv if attention != "mha" else heads,
        head_dim=draw(st.sampled_from([2, 4])),
        rotary=attention != "mha" and draw(st.booleans()),
        qk_norm=attention != "mha" and draw(st.booleans()),
        mlp=draw(st.sampled_from(["gelu", "swiglu", "moe"])),
        tie=draw(st.booleans()),
        layers=draw(st.integers(1, 2)),
        hidden=draw(st.sampled_from([6, 10])),
    )
    return options, draw(st.sampled_from([1.41, 1.5, 2.0, 3.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.integers(0, 3))
def test_random_transformer_stacks_exact_or_refused(case, seed):
    options, factor = case
    torch.manual_seed(seed)
    model = Stack(**options)
    try:
        wide, rep, err = widen_and_compare(model, tokens(), factor, seed=seed)
    except graphgrow.VerificationError:
        raise
    except graphgrow.GraphGrowError:
        return  # a clean refusal
    assert err < 1e-9, (options, factor, err)
    for s in rep.spaces:
        assert s.new_width >= s.old_width
        if s.head_dim > 1:
            assert s.new_width % s.head_dim == 0  # whole heads only
        if s.normalized and s.new_width == s.old_width and s.old_width * factor >= s.old_width + 1:
            assert s.frozen_reasons, (options, factor, s.name)  # a stream that stays says why
    if options["tie"]:
        assert wide.head.weight is wide.embed.weight
