"""The fx widening engine: trace, analyse, plan, apply, rebuild, verify."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..core.labels import LabelOverflow
from ..core.relations import free_upstream
from ..core.sites import GrowOptions
from ..core.growth import grow
from ..core.label_tensor import LabelTensor
from ..errors import InputMismatchError, InvalidArgumentError
from .labeling import FxLabelRun, TensorMeta
from .trace import trace_module



class _MetaRecorder(fx.Interpreter):
    """Run the original graph once, keeping shapes of tensors and values of everything else."""

    def __init__(self, gm):
        super().__init__(gm)
        self.meta = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.meta[n] = tree_map(lambda v: TensorMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v,
                                out)
        if n.op == "get_attr" and isinstance(out, torch.Tensor):
            self.meta[n] = TensorMeta(tuple(out.shape), out.dtype)
        return out


def as_input_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise InvalidArgumentError("example_inputs are required: pass a tensor or a tuple of tensors the model accepts")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InvalidArgumentError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


class _TrainingFlags:
    """Put a model in eval mode for the duration of a block and restore every flag."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, f in self.flags.items():
            m.training = f


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Analysis:
    """Traced graph + original-configuration label run of one model."""

    def __init__(self, model: nn.Module, example_inputs):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.inputs = as_input_tuple(example_inputs)
        self.gm, self.leaves = trace_module(model)
        with _TrainingFlags(self.gm), torch.no_grad():
            rec = _MetaRecorder(self.gm)
            try:
                rec.run(*self.inputs)
            except Exception as exc:  # noqa: BLE001 - user input problem
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputMismatchError(f"the example inputs do not fit the model: {msg}") from None
        self.meta = rec.meta
        try:
            self.run = FxLabelRun(self.gm, self.meta).run(self.inputs)
        except LabelOverflow as exc:
            raise InvalidArgumentError(f"example inputs too large for the analysis ({exc}); use a smaller input") from None
        self.table = self.run.table
        self.constraints = self.run.constraints
        self.produced = self.table.produced()


def plan_and_apply(an: Analysis, targets: dict, options: GrowOptions, seed: int, progress=None):
    def attempt(plan):
        run = FxLabelRun(an.gm, an.meta, plan=plan, analysis=an.run, options=options)
        return run.run(an.inputs)

    def upstream(conflict, frozen):
        def labels_of(n):
            return [x for x in tree_flatten(an.run.env.get(n))[0] if isinstance(x, LabelTensor)]

        return free_upstream(list(conflict.node.all_input_nodes), lambda n: n.all_input_nodes, labels_of, frozen)

    return grow(an.constraints, targets, seed, attempt, upstream, progress)


def _set_tensor(mod: nn.Module, name: str, value: np.ndarray):
    old = getattr(mod, name)
    new = torch.from_numpy(np.ascontiguousarray(value)).to(dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        mod._buffers[name] = new


def rebuild(an: Analysis, run: FxLabelRun) -> nn.Module:
    """Deep copy of the user's model with resized layers (a GraphModule if constants changed)."""
    memo = {}
    new_model = copy.deepcopy(an.model, memo)
    modules = dict(new_model.named_modules())
    for name, upd in run.updates.items():
        mod = modules[name]
        for t, v in upd.tensors.items():
            _set_tensor(mod, t, v)
        for a, v in upd.attrs.items():
            if hasattr(mod, a):
                setattr(mod, a, v)
    if not run.arg_updates:
        return new_model
    graph = copy.deepcopy(an.gm.graph, {})
    by_name = {n.name: n for n in graph.nodes}
    for node, (args, kwargs) in run.arg_updates.items():
        target = by_name[node.name]
        target.args = fx.node.map_arg(args, lambda n: by_name[n.name])
        target.kwargs = fx.node.map_arg(kwargs, lambda n: by_name[n.name])
    gm = fx.GraphModule(new_model, graph, type(an.model).__name__ + "Widened")
    return gm


