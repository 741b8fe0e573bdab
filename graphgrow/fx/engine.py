"""The fx widening engine: trace, analyse, plan, apply, rebuild, verify."""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..core.labels import LabelOverflow
from ..core.relations import free_upstream
from ..core.sites import GrowOptions
from ..core.growth import grow
from ..core.label_tensor import LabelTensor
from ..errors import InvalidArgumentError
from .labeling import FxLabelRun
from .shapes import record_shapes
from .trace import trace_module



def as_input_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise InvalidArgumentError("example_inputs are required: pass a tensor or a tuple of tensors the model accepts")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InvalidArgumentError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FxAnalysis:
    """Traced graph + original-configuration label run of one model."""

    def __init__(self, model: nn.Module, example_inputs):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.inputs = as_input_tuple(example_inputs)
        self.gm, self.leaves = trace_module(model)
        self.meta = record_shapes(self.gm, self.inputs)
        try:
            self.run = FxLabelRun(self.gm, self.meta).run(self.inputs)
        except LabelOverflow as exc:
            raise InvalidArgumentError(f"example inputs too large for the analysis ({exc}); use a smaller input") from None
        self.table = self.run.table
        self.constraints = self.run.constraints
        self.produced = self.table.produced()


def plan_and_apply(an: FxAnalysis, targets: dict, options: GrowOptions, seed: int, progress=None, fill: bool = True):
    def attempt(plan):
        run = FxLabelRun(an.gm, an.meta, plan=plan, analysis=an.run, options=options)
        return run.run(an.inputs)

    def upstream(conflict, frozen):
        def labels_of(n):
            return [x for x in tree_flatten(an.run.env.get(n))[0] if isinstance(x, LabelTensor)]

        return free_upstream(list(conflict.node.all_input_nodes), lambda n: n.all_input_nodes, labels_of, frozen)

    return grow(an.constraints, targets, seed, attempt, upstream, progress, fill=fill)


def _new_tensor(old: torch.Tensor, value: np.ndarray) -> torch.Tensor:
    new = torch.from_numpy(np.ascontiguousarray(value)).to(dtype=old.dtype, device=old.device)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def rebuild(an: FxAnalysis, run: FxLabelRun) -> nn.Module:
    """Deep copy of the user's model with resized layers (a GraphModule if constants changed)."""
    # the deep copy takes the new tensors in place of the ones they replace (never cloned: the memo
    # maps each replaced tensor to its successor)
    memo = {}
    originals = dict(an.model.named_modules())
    for name, upd in run.updates.items():
        for t, v in upd.tensors.items():
            old = getattr(originals[name], t)
            memo[id(old)] = _new_tensor(old, v)
    new_model = copy.deepcopy(an.model, memo)
    modules = dict(new_model.named_modules())
    for name, upd in run.updates.items():
        mod = modules[name]
        for a, v in upd.attrs.items():
            if hasattr(mod, a):
                setattr(mod, a, v)
    if not run.arg_updates and not run.mean_scales:
        return new_model
    graph = copy.deepcopy(an.gm.graph, {})
    by_name = {n.name: n for n in graph.nodes}
    for node, (args, kwargs) in run.arg_updates.items():
        target = by_name[node.name]
        target.args = fx.node.map_arg(args, lambda n: by_name[n.name])
        target.kwargs = fx.node.map_arg(kwargs, lambda n: by_name[n.name])
    for node, scale in run.mean_scales.items():
        # a mean over a stream that fill + rescale widened: back to the mean over the original channels
        mean = by_name[node.name]
        with graph.inserting_after(mean):
            scaled = graph.call_function(operator.mul, (mean, float(scale)))
        mean.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm = fx.GraphModule(new_model, graph, type(an.model).__name__ + "Widened")
    return gm


