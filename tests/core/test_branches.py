"""The residual-branch walk of block copy (graphgrow.core.branches) on a toy frontend: no torch, no onnx."""

import pytest

from graphgrow.core.branches import (ADD, LINEAR, NORM, OTHER, PARAM, PASS, PRODUCT, SUM, VIEW, ZERO, Reading,
                                     branch_plan)
from graphgrow.errors import UnsupportedModelError


class Toy:
    """A block given as {node: (Reading, params it depends on)}; "x" is the stream (outside the block)."""

    name = "toy"

    def __init__(self, nodes: dict, out: str):
        self.nodes, self.out = nodes, out

    def output(self):
        return self.out

    def read(self, n):
        return self.nodes[n][0] if n in self.nodes else Reading(OTHER)

    def depends(self, n):
        return len(self.nodes[n][1]) if n in self.nodes else 0

    def inside(self, n):
        return n in self.nodes

    def describe(self, n):
        return f"node {n!r}"


ALL = {"o.w", "o.b", "up.w", "down.w"}


def pre_norm_layer(**changes):
    """x + o(attn(norm x)) + down(act(up(norm h))) with a routed MoE-like product and a zero accumulator."""
    nodes = {
        "n1": (Reading(PASS, ("x",), normalizes=True), set()),
        "attn": (Reading(LINEAR, ("n1",), params=("o.w", "o.b")), {"o.w", "o.b"}),
        "h": (Reading(ADD, ("x", "attn")), {"o.w", "o.b"}),
        "up": (Reading(LINEAR, ("h",), params=("up.w",)), {"o.w", "o.b", "up.w"}),
        "route": (Reading(OTHER), {"o.w", "o.b", "gate.w"}),
        "down": (Reading(LINEAR, ("up",), params=("down.w",)), {"o.w", "o.b", "up.w", "down.w"}),
        "scaled": (Reading(PRODUCT, ("down", "route")), {"o.w", "o.b", "up.w", "down.w", "gate.w"}),
        "acc": (Reading(ZERO), {"o.w"}),
        "moe": (Reading(SUM, ("acc", "scaled")), {"o.w", "o.b", "up.w", "down.w", "gate.w"}),
        "mlp": (Reading(VIEW, ("moe",)), {"o.w", "o.b", "up.w", "down.w", "gate.w"}),
        "out": (Reading(ADD, ("h", "mlp")), {"o.w", "o.b", "up.w", "down.w", "gate.w"}),
    }
    nodes.update(changes)
    return Toy(nodes, "out")


def test_the_walk_finds_the_stream_and_the_branch_ends():
    plan = branch_plan(pre_norm_layer())
    assert plan.stream == "x"
    assert plan.zero == {"o.w", "o.b", "down.w"}  # the router and the up projection stay


def test_post_norm_is_refused():
    block = pre_norm_layer(final=(Reading(NORM, ("out",), normalizes=True), {"o.w"}))
    block.out = "final"
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        branch_plan(block)


@pytest.mark.parametrize("change, words", [
    ({"down": (Reading(OTHER), ALL)}, "node 'down'"),  # not a linear map
    ({"moe": (Reading(SUM, ("x", "scaled")), ALL)}, "node 'x'"),  # a term the copy cannot zero
    ({"down": (Reading(NORM, ("up",)), ALL)}, "norm with a bias"),
])
def test_a_branch_that_cannot_be_zeroed_is_refused(change, words):
    with pytest.raises(UnsupportedModelError, match=words):
        branch_plan(pre_norm_layer(**change))


def test_no_residual_add_is_refused():
    block = pre_norm_layer()
    block.out = "down"
    with pytest.raises(UnsupportedModelError, match="residual add"):
        branch_plan(block)


def test_a_parameter_added_last_is_zeroed():
    block = pre_norm_layer(scale=(Reading(PARAM, params=("gamma",)), {"gamma"}),
                           mlp=(Reading(PRODUCT, ("moe", "scale")), {"o.w", "down.w", "gamma", "up.w", "gate.w"}))
    assert branch_plan(block).zero == {"o.w", "o.b", "down.w"}  # the product's branch carries more parameters
