"""Net2DeeperNet on torch.fx graphs: insert identity blocks, calibrate their batch norms.

The weights come from :mod:`graphgrow.core.deepen` (numpy); this module traces the model, proves inputs
non-negative where a ReLU is wanted, builds the torch modules and rewires the graph.
"""

from __future__ import annotations

import collections
import copy
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_flatten

from ..core import deepen as core
from ..core.deepen import Insertion, Sign
from ..errors import InvalidArgumentError
from . import ops
from .engine import as_input_tuple, count_params
from .shapes import record_shapes
from .trace import inline_call, trace_module


class Residual(nn.Module):
    """x + body(x); the body's last layer starts at zero, so the block starts as the identity."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


# ------------------------------------------------------------------------------------------- non-negativity (fx)

def _clamp_sign(node: fx.Node) -> Sign | None:
    """torch.clamp / .clamp / F.hardtanh / nn.Hardtanh with a lower bound ≥ 0 give x ≥ 0."""
    lo = None
    if node.op in ("call_function", "call_method") and node.target in (torch.clamp, torch.clip, "clamp", "clip",
                                                                       "clamp_min", torch.clamp_min):
        lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
    elif node.op == "call_function" and node.target in (F.hardtanh, F.hardtanh_):
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
    else:
        return None
    if isinstance(lo, (int, float)) and lo >= 0:
        return Sign.yes()
    return Sign.no(f"node '{node.name}' clamps at {lo!r}, which allows negative values")


def nonneg_signs(gm: fx.GraphModule) -> dict:
    """node → Sign for every node of ``gm`` (placeholders may be negative; constants are read)."""
    modules = dict(gm.named_modules())
    signs: dict = {}
    sizes: set = set()  # nodes holding shapes and sizes (x.shape, x.size(1), arithmetic on them), not tensors

    def operand(a) -> Sign | None:
        if isinstance(a, fx.Node):
            return signs.get(a, Sign.no(f"node '{a.name}'")) if a not in sizes else None
        if isinstance(a, bool):
            return None
        if isinstance(a, (int, float)):
            return Sign.yes() if a >= 0 else Sign.no(f"the constant {a}")
        if isinstance(a, (list, tuple)):
            parts = [operand(x) for x in a]
            parts = [p for p in parts if p is not None]
            bad = [p for p in parts if not p.nonneg]
            return bad[0] if bad else (Sign.yes() if parts else None)
        return None

    for node in gm.graph.nodes:
        what = f"node '{node.name}'"
        if node.op == "placeholder":
            signs[node] = Sign.no(f"the model input '{node.name}' may be negative")
            continue
        if node.op == "get_attr":
            try:
                val = operator.attrgetter(node.target)(gm)
                signs[node] = core.constant_sign(val.detach().cpu().numpy(), f"the constant '{node.target}'")
            except Exception:  # noqa: BLE001 - anything unreadable is unknown
                signs[node] = Sign.no(f"the constant '{node.target}'")
            continue
        if node.op == "output":
            continue
        inputs = node.all_input_nodes
        if (node.op == "call_function" and node.target is getattr and node.args[1] in ops.SIZE_ATTRS) or \
                (node.op == "call_method" and node.target in ("size", "dim", "numel")) or \
                (inputs and all(a in sizes for a in inputs) and not isinstance(node.meta.get("tensor_meta"),
                                                                              TensorMetadata)):
            sizes.add(node)
            continue
        clamp = _clamp_sign(node)
        if clamp is not None:
            signs[node] = clamp
            continue
        kind = None
        if node.op == "call_module":
            mod = modules.get(node.target)
            what = f"module '{node.target}' ({type(mod).__name__})"
            if isinstance(mod, ops.NONNEG_SOURCE_MODULES):
                kind = "relu"
            elif isinstance(mod, nn.Hardtanh) and mod.min_val >= 0:
                kind = "relu6"
            elif isinstance(mod, ops.SIGN_MOVE_MODULES):
                kind = "move"
            elif isinstance(mod, ops.SIGN_POOL_MODULES):
                # bicubic interpolation overshoots: it can turn x ≥ 0 into small negatives
                kind = None if "cubic" in str(getattr(mod, "mode", "")) else "pool"
        elif node.op == "call_function":
            kind = ops.NONNEG_SOURCE_FUNCS.get(node.target) or ops.SIGN_KIND_FUNCS.get(node.target)
            what = f"function '{getattr(node.target, '__name__', node.target)}' at node '{node.name}'"
            if kind == "add" and node.kwargs.get("alpha", 1) < 0:
                kind = None
            if kind == "resize" and "cubic" in str(node.kwargs.get("mode", node.args[3] if len(node.args) > 3
                                                                    else "nearest")):
                kind = None
        elif node.op == "call_method":
            kind = ops.NONNEG_SOURCE_METHODS.get(node.target) or ops.SIGN_KIND_METHODS.get(node.target)
            what = f"method '.{node.target}()' at node '{node.name}'"
        if kind in ops.SIGN_SHAPE_ARG_KINDS:
            operands = [operand(a) for a in node.all_input_nodes]
        else:
            operands = [operand(a) for a in list(node.args) + list(node.kwargs.values())
                   if not (isinstance(a, str) or a is None)]
        operands = [o for o in operands if o is not None]
        signs[node] = core.combine_sign(kind, operands, what)
    return signs


# ------------------------------------------------------------------------------------------------- block modules

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=like.dtype, device=like.device)


def _set_bn(bn: nn.modules.batchnorm._BatchNorm, params: dict):
    with torch.no_grad():
        for k, v in params.items():
            getattr(bn, k).copy_(_tensor(v, getattr(bn, k)))


def _conv_stage(channels: int, kernel: tuple, spatial: int, rng, identity: bool, dtype=None) -> nn.Sequential:
    conv = _CONV[spatial](channels, channels, kernel, padding=core.same_padding(kernel), bias=False, dtype=dtype)
    bn = _BN[spatial](channels, eps=core.BN_EPS, dtype=dtype)
    with torch.no_grad():
        w = core.identity_conv_weight(channels, kernel) if identity else core.default_init(rng, tuple(conv.weight.shape))
        conv.weight.copy_(_tensor(w, conv.weight))
    if identity:
        _set_bn(bn, core.identity_bn(np.zeros(channels), np.ones(channels)))
    return nn.Sequential(collections.OrderedDict(conv=conv, bn=bn))


def _linear(features: int, rng, identity: bool, dtype=None) -> nn.Linear:
    lin = nn.Linear(features, features, dtype=dtype)
    with torch.no_grad():
        if identity:
            lin.weight.copy_(_tensor(np.eye(features), lin.weight))
            lin.bias.zero_()
        else:
            lin.weight.copy_(_tensor(core.default_init(rng, (features, features)), lin.weight))
            lin.bias.copy_(_tensor(core.default_init(rng, (features,), fan_in=features), lin.bias))
    return lin


def build_block(spec: core.BlockSpec, form: str, shape: tuple, relu: bool, rng, dtype=None) -> nn.Module:
    """The torch module of one block for an input of ``shape`` (identity at construction, eval mode).

    Built in ``dtype`` (default: torch's default), so identity weights such as γ = sqrt(1 + eps) are rounded
    once, in the model's own precision (float64 models stay exact to ~1e-16).
    """
    if form == "linear":
        d = shape[-1]
        if spec.block == "residual":
            last = nn.Linear(d, d, dtype=dtype)
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
            return Residual(nn.Sequential(collections.OrderedDict(fc1=_linear(d, rng, False, dtype), act=nn.ReLU(),
                                                                  fc2=last)))
        parts = collections.OrderedDict(fc=_linear(d, rng, True, dtype))
        if relu:
            parts["act"] = nn.ReLU()
        return nn.Sequential(parts)
    channels, spatial = shape[1], len(shape) - 2
    kernels = spec.stage_kernels(spatial)
    if spec.block == "residual":
        if len(kernels) == 1:
            kernels = kernels * 2
        stages = []
        for i, k in enumerate(kernels):
            st = _conv_stage(channels, k, spatial, rng, identity=False, dtype=dtype)
            if i < len(kernels) - 1:
                st.add_module("act", nn.ReLU())
            else:  # the zero γ/β that makes x + body(x) = x
                with torch.no_grad():
                    st.bn.weight.zero_()
                    st.bn.bias.zero_()
            stages.append(st)
        return Residual(nn.Sequential(*stages))
    stages = []
    for k in kernels:
        st = _conv_stage(channels, k, spatial, rng, identity=True, dtype=dtype)
        if relu:
            st.add_module("act", nn.ReLU())
        stages.append(st)
    return nn.Sequential(*stages)


# ------------------------------------------------------------------------------------------------ insertion points

class AmbiguousPoint:
    """A container call from which several values leave: no single output to put a block on."""

    def __init__(self, name: str, outs: list):
        self.name, self.outs = name, outs

    def message(self) -> str:
        names = ", ".join(f"'{n.name}'" for n in self.outs)
        return (f"after names the module '{self.name}', but {len(self.outs)} values leave it ({names}), so it has no "
                f"single output; name one of these nodes instead")


def _scope_calls(gm: fx.GraphModule) -> dict:
    """module path -> {call key: nodes inside that call}, from ``node.meta["nn_module_stack"]``.

    Symbolic tracing records, for every node, the stack of module calls it was traced in, outermost first, keyed
    by call (``"layer1.0.relu"``, then ``"layer1.0.relu@1"`` for the second call of the same module); a copied or
    rewritten GraphModule keeps that metadata, so container names of the original model still address points.
    """
    calls: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        for key, val in (n.meta.get("nn_module_stack") or {}).items():
            path = val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else str(key).split("@")[0]
            if path:
                calls[path][key].append(n)
    return calls


def insertion_candidates(gm: fx.GraphModule) -> dict:
    """name -> insertion points, in graph order.

    * a module that the graph calls (a ``call_module`` node: a leaf module such as ``"layer1.0.relu"``): every
      call is a point;
    * a container (``"layer2"``, ``"layer1.0"``), from the ``nn_module_stack`` that tracing records: each call
      of it is a point, namely the one node inside the call whose value is used by a node outside it (the
      container's output); a call from which several values leave is an :class:`AmbiguousPoint`;
    * then every node name (model inputs included).
    """
    cands: dict = {}
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    for n in nodes:
        if n.op == "call_module":
            cands.setdefault(n.target, []).append(n)
    for path, calls in _scope_calls(gm).items():
        if path in cands:
            continue
        points = []
        for inside in calls.values():
            members = set(inside)
            outs = [n for n in inside if any(u not in members for u in n.users)]
            if len(outs) == 1:
                points.append(outs[0])
            elif len(outs) > 1:
                points.append(AmbiguousPoint(path, outs))
        if points:
            cands[path] = points
    for n in nodes:
        cands.setdefault(n.name, []).append(n)
    return cands


def module_names(gm: fx.GraphModule) -> set:
    """Names of ``insertion_candidates`` that are module paths (called leaves and traced containers)."""
    return {n.target for n in gm.graph.nodes if n.op == "call_module"} | set(_scope_calls(gm))


def select_points(gm: fx.GraphModule, after) -> list:
    """``(name, node)`` pairs chosen by ``after``; refuses a container with several outputs in one sentence."""
    chosen = core.select_names(insertion_candidates(gm), after, "node or module")
    for _, point in chosen:
        if isinstance(point, AmbiguousPoint):
            raise InvalidArgumentError(point.message())
    return chosen


def _block_scope(name: str, node: fx.Node, modules: set, path: str, block: nn.Module) -> dict:
    """``nn_module_stack`` of a block put after ``node``: the scopes around the point, then the block itself.

    After a module (leaf or container) the block sits beside that module, in its parent's scope; after a node
    named by its node name it sits in the node's own scope.  So a container's output stays its one output, the
    block is a container of its own (``"layer2_deep"``), and later passes resolve the same names.
    """
    stack = collections.OrderedDict()
    stop = {name} if name in modules else set()
    if node.op == "call_module":
        stop.add(node.target)
    for key, val in (node.meta.get("nn_module_stack") or {}).items():
        if (val[0] if isinstance(val, tuple) and val else key) in stop:
            break
        stack[key] = val
    stack[path] = (path, type(block))
    return stack


def _unique_module_name(gm: fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _block_base_name(name: str, node: fx.Node, modules: set) -> str:
    """New module path: beside the module the user named, else after the node name."""
    if node.op == "call_module" or "." in name or name in modules:
        return f"{name}_deep"
    return f"deep_{node.name}"


# --------------------------------------------------------------------------------------------------- calibration

def _calibration_batches(calibrate, n_inputs: int) -> list:
    batches = []
    try:
        it = iter(calibrate)
    except TypeError:
        raise InvalidArgumentError(f"calibrate must be an iterable of input batches, not {type(calibrate).__name__}") \
            from None
    for b in it:
        if isinstance(b, torch.Tensor):
            b = (b,)
        if not isinstance(b, (list, tuple)) or len(b) < n_inputs or not all(
                isinstance(x, torch.Tensor) for x in b[:n_inputs]):
            raise InvalidArgumentError("each calibrate batch must be a tensor or a tuple of tensors starting with the "
                                       "model's inputs (a DataLoader's (inputs, labels) works)")
        batches.append(tuple(b[:n_inputs]))
    if not batches:
        raise InvalidArgumentError("calibrate gave no batches")
    return batches


def _outputs(model, args) -> list:
    leaves, _ = tree_flatten(model(*args))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def train_mode_deviation(reference: nn.Module, candidate: nn.Module, batches: list, seed: int) -> float:
    """‖f_cand(x) − f_ref(x)‖ / ‖f_ref(x)‖ with both models in training mode, over ``batches``.

    Both run on copies (training mode updates running statistics) with the same seed, so dropout masks agree.
    """
    ref, cand = copy.deepcopy(reference).train(), copy.deepcopy(candidate).train()
    num = den = 0.0
    with torch.no_grad():
        for i, b in enumerate(batches):
            torch.manual_seed(seed + i)
            ya = _outputs(ref, b)
            torch.manual_seed(seed + i)
            yb = _outputs(cand, b)
            for a, c in zip(ya, yb):
                num += float(((c.double() - a.double()) ** 2).sum())
                den += float((a.double() ** 2).sum())
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def calibrate_blocks(gm: fx.GraphModule, paths: list, batches: list, seed: int = 0):
    """Set every new batch norm from the activations it sees on ``batches`` with the model in training mode.

    Running statistics become the mean and (biased) variance of its input; in identity chains γ/β undo them
    (γ = sqrt(var + eps), β = mean), so in training mode the block sees batches with about these statistics and
    passes them through; eval mode stays exact.  Stage k's input depends on stages < k, so the stages are
    calibrated one after the other, each on a training-mode copy of the model (which may update its own running
    statistics freely).  Residual bodies keep their γ/β (zero on the last) and get only the statistics.
    """
    stages = []  # (module path of a new BN, identity?, depth within its block)
    modules = dict(gm.named_modules())
    for path in paths:
        blk = modules[path]
        bn_names = [n for n, m in blk.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for depth, n in enumerate(bn_names):
            stages.append((f"{path}.{n}", not isinstance(blk, Residual), depth))
    for depth in range(max((d for _, _, d in stages), default=-1) + 1):
        todo = [(p, ident) for p, ident, d in stages if d == depth]
        probe = copy.deepcopy(gm).train()
        probe_modules = dict(probe.named_modules())
        seen = {p: core.ChannelStats() for p, _ in todo}

        def keep(path):
            def hook(m, args):
                # reduce on the model's device, in float64; only per-channel vectors leave it
                x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
                mean = x.mean(dim=1)
                seen[path].add(x.shape[1], mean.cpu().numpy(), ((x - mean[:, None]) ** 2).sum(dim=1).cpu().numpy())
            return hook

        for p, _ in todo:
            probe_modules[p].register_forward_pre_hook(keep(p))
        with torch.no_grad():
            for i, b in enumerate(batches):
                torch.manual_seed(seed + i)
                probe(*b)
        del probe
        for p, ident in todo:
            bn = modules[p]
            mean, var = seen.pop(p).result()
            params = core.identity_bn(mean, var, bn.eps)
            if not ident:
                params = {"running_mean": params["running_mean"], "running_var": params["running_var"]}
            _set_bn(bn, params)


# ------------------------------------------------------------------------------------------------------- deepen

def deepen_module(model: nn.Module, *, after, block: str = "conv-bn-relu", kernel=3, calibrate=None, example_inputs,
                  seed: int = 0) -> tuple:
    """Insert the blocks; returns ``(GraphModule, DeepenReport, new module paths, calibration batches or None,
    example inputs)``, not yet calibrated nor verified."""
    spec = core.block_spec(block, kernel)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, not {seed!r}")
    batches = _calibration_batches(calibrate, len(inputs)) if calibrate is not None else None
    work = copy.deepcopy(model)
    gm, _leaves = trace_module(work)
    record_shapes(gm, inputs)  # (sets node.meta["tensor_meta"], as torch.fx's ShapeProp does)
    chosen = select_points(gm, after)
    modules = module_names(gm)
    signs = nonneg_signs(gm)
    rng = np.random.default_rng(seed)
    report = core.DeepenReport(params_before=count_params(model))
    plans = []
    for name, node in chosen:
        meta = node.meta.get("tensor_meta")
        where = f"the output of '{name}'"
        if not isinstance(meta, TensorMetadata):
            raise InvalidArgumentError(f"{where} is not a single tensor, so it has no channel axis")
        if not meta.dtype.is_floating_point:
            raise InvalidArgumentError(f"{where} is a {meta.dtype} tensor; blocks go on floating-point activations")
        shape = tuple(meta.shape)
        form = core.block_form(spec, len(shape), where)
        sign = signs.get(node, Sign.no(f"node '{node.name}'"))
        relu = spec.block == "conv-bn-relu" or (spec.block == "linear" and sign.nonneg)
        if spec.block == "conv-bn-relu" and not sign.nonneg:
            raise InvalidArgumentError(
                f"block 'conv-bn-relu' after '{name}' would not be the identity: its input may be negative "
                f"({sign.reason}); use block='conv-bn' or 'residual'")
        plans.append((name, node, form, shape, relu, sign))
    device = inputs[0].device if isinstance(inputs[0], torch.Tensor) else torch.device("cpu")
    paths = []
    for name, node, form, shape, relu, sign in plans:
        mod = build_block(spec, form, shape, relu, rng, dtype=node.meta["tensor_meta"].dtype)
        mod = mod.to(device=device, dtype=node.meta["tensor_meta"].dtype).train(model.training)
        path = _unique_module_name(gm, _block_base_name(name, node, modules))
        gm.add_submodule(path, mod)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(path, (node,))
        new.meta["nn_module_stack"] = _block_scope(name, node, modules, path, mod)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        inline_call(gm, new)  # the block's own layers as nodes, as a trace of the deeper model would give
        paths.append(path)
        kernels = [list(k) for k in spec.stage_kernels(len(shape) - 2)] if form == "conv" else []
        report.insertions.append(Insertion(
            after=name, name=path, block=spec.block, form=form, channels=int(shape[1] if form == "conv" else shape[-1]),
            kernels=kernels, activation=relu,
            nonneg_reason="input is non-negative" if sign.nonneg else f"input may be negative: {sign.reason}"))
    gm.graph.lint()
    gm.recompile()
    report.params_after = count_params(gm)
    return gm, report, paths, batches, inputs
