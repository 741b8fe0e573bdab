"""Block expansion on plain torch models (block="copy"): exact, the copy's stream projections zero."""

import pytest
import torch

import graphgrow
from graphgrow.errors import InvalidArgumentError, UnsupportedModelError
from graphgrow.models.transformer import tiny_lm, tiny_vit
from tests.transformer_stacks import Stack


@pytest.mark.parametrize("make,x,after,zeroed", [
    (tiny_lm, lambda: torch.randint(0, 50, (2, 8)), "layers.(0|2)", {"attn.o_proj.weight", "mlp.down_proj.weight"}),
    (tiny_vit, lambda: torch.randn(2, 3, 32, 32), "blocks.1", {"proj.weight", "proj.bias", "fc2.weight", "fc2.bias"}),
])
def test_block_copy_is_exact(make, x, after, zeroed):
    torch.manual_seed(0)
    model = make().eval()
    deep = graphgrow.deepen(model, after=after, block="copy", example_inputs=(x(),))
    rep = deep.graphgrow_report
    assert rep.check.passed and rep.check.outputs[0].max_rel == 0.0
    copies = [i.name for i in rep.insertions]
    assert len(copies) == after.count("|") + 1
    twin = deep.get_submodule(copies[0])
    params = dict(twin.named_parameters())
    assert all(not params[k].any() for k in zeroed)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in model.parameters())


def test_post_norm_block_is_refused():
    model = Stack(vocab=50, heads=4, kv_heads=4, head_dim=8, hidden=32, layers=2, norm="layer", post=True,
                  attention="sdpa", rotary=False, qk_norm=False, mlp="gelu", tie=False).eval()
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        graphgrow.deepen(model, after="blocks.0", block="copy", example_inputs=(torch.randint(0, 50, (1, 6)),))


def test_after_must_name_a_submodule():
    with pytest.raises(InvalidArgumentError, match="matches no submodule"):
        graphgrow.deepen(tiny_lm().eval(), after="nope", block="copy", example_inputs=(torch.randint(0, 50, (1, 8)),))
