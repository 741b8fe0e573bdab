"""``WidenPass``: Net2WiderNet as a torch.fx pass."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class WidenPass(PassBase):
    """GraphModule in, widened GraphModule out (verified before it is returned).

    Takes the keyword arguments of :func:`graphgrow.widen`; the report of the
    last call is kept as ``self.report`` (and as ``graph_module.graphgrow_report``).
    On a GraphModule the result is the same model as ``graphgrow.widen`` on the
    module it was traced from (same state_dict, same seed), and its graph keeps
    the nodes' ``nn_module_stack``, so module and container names such as
    ``"layer2"`` still address the same points for a following
    :class:`~graphgrow.passes.DeepenPass`.
    """

    def __init__(self, factor=1.41, *, example_inputs, **options):
        super().__init__()
        self.factor = factor
        self.example_inputs = example_inputs
        self.options = options
        self.report = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        from ..api import widen
        from ..fx.trace import trace_module

        out = widen(graph_module, self.factor, example_inputs=self.example_inputs, **self.options)
        self.report = out.graphgrow_report
        if not isinstance(out, fx.GraphModule):  # a plain module came in: hand a graph on
            out, _ = trace_module(out)
            out.graphgrow_report = self.report
        return PassResult(out, bool(self.report.widened))
