"""The residual-branch reading of block copy, once for every frontend (torch.fx, ONNX).

A copy of a residual block computes the identity when every branch it adds to the stream is zero.  The
block's output is read as a sum, through its residual adds, of one term that does not depend on the block's
parameters (the stream) and of branches that do; each branch is followed back through ops that keep a zero
zero (reshapes, casts, gathers, RMSNorm, products with the branch's value) to the linear maps whose weights
(and biases) the copy zeroes.  A block that normalizes after its add (post-norm) is refused: its copy with
zeroed branches would normalize the stream, not return it.

The walk decides; the frontend only says what each node is (:class:`Reading`), which of the block's
parameters a node depends on, and whether it lies inside the block (:class:`BlockGraph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UnsupportedModelError

# What a node is, for the walk:
VIEW = "view"        # the operand itself, reshaped or cast (a sum stays a sum through it)
PASS = "pass"        # zero when its one operand is zero (a gather, a reduction, RMSNorm)
ADD = "add"          # operand + operand (a residual add inside the block, or a sum on a branch)
SUM = "sum"          # zero when all operands are (a difference, an index_add into zeros)
PRODUCT = "product"  # zero when the operand carrying the branch is (mul; a division's numerator)
LINEAR = "linear"    # a linear map whose weight is the block's parameter: zero when ``params`` are zeroed
PARAM = "param"      # one of the block's parameters (a bias or a layer scale added last)
ZERO = "zero"        # zero whatever the inputs (zeros_like)
NORM = "norm"        # a normalization with a shift (LayerNorm with bias): not zero on a zero input
OTHER = "other"      # anything else: a branch ending here cannot be made zero


@dataclass(frozen=True)
class Reading:
    """What the frontend says one node is: its ``kind``, the operands the kind speaks of, the parameters a
    LINEAR or PARAM node is zeroed by, and whether the node normalizes (post-norm when a block ends in it)."""

    kind: str
    operands: tuple = ()
    params: tuple = ()
    normalizes: bool = False


class BlockGraph(Protocol):
    """A frontend's view of one block: nodes are whatever the frontend uses (fx nodes, ONNX value names)."""

    name: str  # the block, for messages ("model.layers.1", "'blocks.0'")

    def output(self) -> Any: ...  # the block's one output value

    def read(self, node) -> Reading: ...

    def depends(self, node) -> int: ...  # how many of the block's own parameters the value depends on

    def inside(self, node) -> bool: ...  # is the node computed by the block?

    def describe(self, node) -> str: ...  # "node 'index_6' (index.Tensor)"


@dataclass
class BranchPlan:
    """The result of the walk: the stream term the block's output starts from, the parameters to zero."""

    stream: Any
    zero: set


def past_views(g: BlockGraph, node):
    """``node`` past reshapes and casts."""
    while (r := g.read(node)).kind == VIEW:
        node = r.operands[0]
    return node


def residual_terms(g: BlockGraph, node) -> list:
    """The terms of the sum ``node`` computes through the block's adds (the residual chain, parallel branches)."""
    out, todo = [], [node]
    while todo:
        n = past_views(g, todo.pop())
        r = g.read(n)
        if r.kind == ADD and g.inside(n) and len(r.operands) == 2:
            todo.extend(reversed(r.operands))
        else:
            out.append(n)
    return out


def _refuse(g: BlockGraph, node) -> UnsupportedModelError:
    return UnsupportedModelError(f"the branch of {g.name} ending at {g.describe(node)} is not a linear map of "
                                 "the layer's parameters: its copy cannot be made to add 0")


def zero_targets(g: BlockGraph, branch) -> set:
    """The parameters whose zeroing makes ``branch`` zero; UnsupportedModelError where none can."""
    found: set = set()
    todo, seen = [branch], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        r = g.read(node)
        if r.kind in (LINEAR, PARAM) and r.params:
            found.update(r.params)
        elif r.kind == ZERO:
            continue
        elif r.kind in (VIEW, PASS):
            todo.append(r.operands[0])
        elif r.kind in (ADD, SUM):
            # every operand must be zero: one not carrying the block's parameters stays what it is
            for a in r.operands:
                if not g.depends(a) and g.read(a).kind != ZERO:
                    raise _refuse(g, a)
                todo.append(a)
        elif r.kind == PRODUCT:
            carrying = [a for a in r.operands if g.depends(a)]
            if not carrying:
                raise _refuse(g, node)
            todo.append(max(carrying, key=g.depends))
        elif r.kind == NORM:
            raise UnsupportedModelError(f"{g.name}: a branch ends in a norm with a bias ({g.describe(node)}): a "
                                        "zeroed copy would not add 0")
        else:
            raise _refuse(g, node)
    return found


def branch_plan(g: BlockGraph) -> BranchPlan:
    """What a copy of the block must zero to add nothing to the residual stream (see the module docstring)."""
    out = past_views(g, g.output())
    if g.read(out).normalizes:
        raise UnsupportedModelError(f"{g.name} normalizes after its residual add (a post-norm block): a copy "
                                    "with zeroed projections would not be the identity")
    terms = residual_terms(g, out)
    stream = [t for t in terms if not g.depends(t) and g.read(t).kind != ZERO]
    branches = [t for t in terms if t not in stream]
    if len(terms) < 2 or len(stream) != 1:
        raise UnsupportedModelError(f"{g.name} does not end in a residual add of its input and its branches (it "
                                    f"ends in {g.describe(out)}): block copy needs one")
    zero: set = set()
    for b in branches:
        zero |= zero_targets(g, b)
    return BranchPlan(stream[0], zero)
