"""Block expansion on a plain torch model: ``graphgrow.deepen(model, after="blocks.3", block="copy")``.

Each chosen submodule (a residual block called once on one tensor) gets a copy called right after it, whose
projections into the residual stream are zero, so the copy returns its input. The projections are found on
the block's own graph (torch.export, lifted: :func:`graphgrow.fx.branches.branch_outputs`, the same reading as
for transformers layers); a block that normalizes after its residual add, or whose branch does not end in a
linear map, is refused with the reason. The result is a GraphModule; it is verified by the caller.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ..core.deepen import DeepenReport, Insertion, select_names
from ..errors import InvalidArgumentError, TraceError, UnsupportedModelError, first_line
from .aten import lift_exported
from .branches import branch_outputs
from .engine import as_input_tuple, count_params
from .shapes import record_shapes
from .trace import trace_with_leaves


def _chosen(model: nn.Module, after) -> list:
    """The submodules ``after`` chooses (:func:`graphgrow.core.deepen.select_names`), outermost only."""
    names = [n for n, _ in select_names({n: [n] for n, _ in model.named_modules() if n}, after,
                                        f"submodule of {type(model).__name__}")]
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def zeroed_copy(block: nn.Module, x: torch.Tensor) -> tuple:
    """(a copy of ``block`` whose residual branches write 0, the zeroed parameter names)."""
    try:
        with torch.no_grad():
            program = torch.export.export(block, (x,), strict=False)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"torch.export cannot capture {type(block).__name__}: {first_line(exc)}") from None
    names = branch_outputs(lift_exported(program.module()), None)
    twin = copy.deepcopy(block)
    state = dict(twin.named_parameters())
    with torch.no_grad():
        for name in names:
            state[name].zero_()
    return twin, sorted(names)


def copy_blocks(model: nn.Module, *, after, example_inputs) -> tuple:
    """(GraphModule with the copies, DeepenReport, inputs); not verified."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    work = copy.deepcopy(model)
    paths = _chosen(work, after)
    gm = trace_with_leaves(work, paths)
    record_shapes(gm, inputs)
    report = DeepenReport(params_before=count_params(model))
    for path in paths:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
        if len(calls) != 1:
            raise UnsupportedModelError(f"'{path}' is called {len(calls)} times; a block to copy is called once")
        node = calls[0]
        arg_meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
        out_meta = node.meta.get("tensor_meta")
        if len(node.args) != 1 or node.kwargs or not hasattr(arg_meta, "shape") or not hasattr(out_meta, "shape") \
                or tuple(arg_meta.shape) != tuple(out_meta.shape):
            raise UnsupportedModelError(f"'{path}' does not map one tensor to a tensor of the same shape: a copy "
                                        "cannot follow it")
        x = torch.randn(tuple(arg_meta.shape), dtype=arg_meta.dtype)
        twin, zeroed = zeroed_copy(gm.get_submodule(path), x)
        name = path.replace(".", "_") + "_copy"
        gm.add_submodule(name, twin)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        report.insertions.append(Insertion(after=path, name=name, block="copy", form="block",
                                           channels=int(arg_meta.shape[-1]), kernels=[], activation=False,
                                           nonneg_reason=""))
        report.notes.append(f"{path} copied as {name}, zeroed: {', '.join(zeroed)}")
    gm.recompile()
    report.params_after = count_params(gm)
    return gm, report, inputs
