"""``DeepenPass``: Net2DeeperNet as a torch.fx pass."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class DeepenPass(PassBase):
    """GraphModule in, deepened GraphModule out (verified before it is returned).

    Takes the keyword arguments of :func:`graphgrow.deepen`; the report of the last call is kept as
    ``self.report`` (and as ``graph_module.graphgrow_report``).  ``after`` names points as on the module the
    graph was traced from: leaf modules (every call), containers such as ``"layer2"`` (their one output, read
    from the nodes' ``nn_module_stack``) and node names; the result equals :func:`graphgrow.deepen` on that
    module, and passes compose in a ``torch.fx`` ``PassManager``.
    """

    def __init__(self, *, after, example_inputs, **options):
        super().__init__()
        self.after = after
        self.example_inputs = example_inputs
        self.options = options
        self.report = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        from ..api import deepen

        out = deepen(graph_module, after=self.after, example_inputs=self.example_inputs, **self.options)
        self.report = out.graphgrow_report
        return PassResult(out, bool(self.report.insertions))
