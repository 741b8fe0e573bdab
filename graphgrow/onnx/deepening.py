"""Net2DeeperNet on ONNX graphs (no torch import); the library behind ``graphgrow deepen``.

A block goes on one value ``t``: its producer now writes ``t`` under a new name, the block reads that and writes
``t``, so every consumer (and a graph output of that name) reads the block without being touched.  On a graph
input the consumers are rewired instead.  The block's weights come from :mod:`graphgrow.core.deepen`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, random_feeds
from ..core import deepen as core
from ..core.deepen import Insertion, Sign
from ..errors import InvalidArgumentError, VerificationError, require_equivalent
from . import ops
from .engine import check_rewritten, count_params, graph_inputs, input_specs, prepare, probe_values, verify

# ------------------------------------------------------------------------------------------- non-negativity (ONNX)

def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def nonneg_signs(model: onnx.ModelProto) -> dict:
    """value name → Sign for every value of the main graph."""
    signs: dict = {}
    for t in model.graph.initializer:
        signs[t.name] = core.constant_sign(numpy_helper.to_array(t), f"the initializer '{t.name}'")
    for inp in graph_inputs(model):
        signs[inp.name] = Sign.no(f"the model input '{inp.name}' may be negative")

    def sign_of(name):
        if not name:
            return None
        return signs.get(name, Sign.no(f"the value '{name}'"))

    for node in model.graph.node:
        what = f"{node.op_type} node '{node.name or node.output[0]}'"
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        out = None
        if op == "Constant":
            try:
                out = core.constant_sign(numpy_helper.to_array(_attr(node, "value")), f"the constant '{node.output[0]}'")
            except Exception:  # noqa: BLE001 - value_float(s)/sparse constants: unknown
                out = Sign.no(f"the constant '{node.output[0]}'")
        elif op in ops.NONNEG_SOURCES:
            out = Sign.yes()
        elif op == "Clip":
            # Clip(x, lo) >= lo: non-negative when the lower bound is (an input from opset 11, an attribute before)
            if len(node.input) >= 2 and node.input[1]:
                bound = sign_of(node.input[1])
            else:
                lo = _attr(node, "min")
                bound = Sign.yes() if lo is not None and lo >= 0 else Sign.no("")
            out = Sign.yes() if bound.nonneg else Sign.no(f"{what} allows negative values")
        elif op in ops.SIGN_OF_DATA:
            kind = ops.SIGN_OF_DATA[op]
            if op in ("Resize", "Upsample") and _attr(node, "mode", b"nearest") in (b"cubic", "cubic"):
                kind = None
            out = core.combine_sign(kind, [sign_of(node.input[0])], what)
        elif op == "Pad":
            operands = [sign_of(node.input[0])]
            if len(node.input) > 2 and node.input[2]:
                operands.append(sign_of(node.input[2]))
            elif _attr(node, "value") is not None:
                operands.append(core.constant_sign(np.asarray(_attr(node, "value")), f"{what}'s pad value"))
            out = core.combine_sign("pad_zero", operands, what)
        elif op in ops.SIGN_OF_ALL:
            out = core.combine_sign(ops.SIGN_OF_ALL[op], [s for s in map(sign_of, node.input) if s is not None], what)
        else:
            out = core.combine_sign(None, [], what)
        for name in node.output:
            if name:
                signs[name] = out
    return signs


# ---------------------------------------------------------------------------------------------------- block nodes

def unique_name(taken: set, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``, ... : the first name not in ``taken`` (which then holds it)."""
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


class _BlockWriter:
    """Appends the nodes and initializers of one block, with names unique in the graph."""

    def __init__(self, prefix: str, taken: set, dtype):
        self.prefix, self.taken, self.dtype = prefix, taken, dtype
        self.nodes: list = []
        self.inits: list = []

    def const(self, tag: str, value: np.ndarray) -> str:
        name = unique_name(self.taken, f"{self.prefix}/{tag}")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def node(self, op: str, tag: str, inputs: list, output: str | None = None, **attrs) -> str:
        out = output or unique_name(self.taken, f"{self.prefix}/{tag}_output")
        self.nodes.append(helper.make_node(op, inputs, [out], name=unique_name(self.taken, f"{self.prefix}/{tag}"),
                                           **attrs))
        return out

    def conv_bn(self, x: str, tag: str, weight: np.ndarray, bn: dict) -> str:
        kernel = list(weight.shape[2:])
        y = self.node("Conv", f"{tag}/Conv", [x, self.const(f"{tag}/conv.weight", weight)], kernel_shape=kernel,
                      pads=list(core.same_padding(kernel)) * 2, strides=[1] * len(kernel))
        return self.node("BatchNormalization", f"{tag}/BatchNormalization",
                         [y, self.const(f"{tag}/bn.weight", bn["weight"]), self.const(f"{tag}/bn.bias", bn["bias"]),
                          self.const(f"{tag}/bn.running_mean", bn["running_mean"]),
                          self.const(f"{tag}/bn.running_var", bn["running_var"])], epsilon=core.BN_EPS)

    def linear(self, x: str, tag: str, weight: np.ndarray, bias: np.ndarray) -> str:
        # torch's Linear stores W (out, in) and computes x W^T; MatMul takes W^T
        y = self.node("MatMul", f"{tag}/MatMul", [x, self.const(f"{tag}/weight_t", np.ascontiguousarray(weight.T))])
        return self.node("Add", f"{tag}/Add", [y, self.const(f"{tag}/bias", bias)])


def write_block(w: _BlockWriter, spec: core.BlockSpec, form: str, shape: tuple, relu: bool, rng, x: str,
                out: str) -> None:
    """The nodes computing ``out`` = block(``x``) (the identity at construction)."""
    if form == "linear":
        d = shape[-1]
        if spec.block == "residual":
            h = w.linear(x, "fc1", core.default_init(rng, (d, d)), core.default_init(rng, (d,), fan_in=d))
            h = w.node("Relu", "act", [h])
            h = w.linear(h, "fc2", np.zeros((d, d)), np.zeros(d))
            w.node("Add", "residual", [x, h], out)
            return
        h = w.linear(x, "fc", np.eye(d), np.zeros(d))
        w.node("Relu", "act", [h], out) if relu else w.node("Identity", "out", [h], out)
        return
    channels, spatial = shape[1], len(shape) - 2
    kernels = spec.stage_kernels(spatial)
    h = x
    if spec.block == "residual":
        kernels = kernels * 2 if len(kernels) == 1 else kernels
        for i, k in enumerate(kernels):
            last = i == len(kernels) - 1
            bn = core.identity_bn(np.zeros(channels), np.ones(channels))
            bn["weight"], bn["bias"] = (np.zeros(channels), np.zeros(channels)) if last else \
                (np.ones(channels), np.zeros(channels))
            h = w.conv_bn(h, f"body.{i}", core.default_init(rng, (channels, channels) + tuple(k)), bn)
            if not last:
                h = w.node("Relu", f"body.{i}/act", [h])
        w.node("Add", "residual", [x, h], out)
        return
    for i, k in enumerate(kernels):
        h = w.conv_bn(h, f"{i}", core.identity_conv_weight(channels, k),
                      core.identity_bn(np.zeros(channels), np.ones(channels)))
        if relu:
            h = w.node("Relu", f"{i}/act", [h])
    w.node("Identity", "out", [h], out)


# --------------------------------------------------------------------------------------------------- the rewrite

def insertion_candidates(model: onnx.ModelProto) -> dict:
    """name → [value]: single-output node names, then value names (node outputs and graph inputs)."""
    cands: dict = {}
    for node in model.graph.node:
        outs = [o for o in node.output if o]
        if node.name and len(outs) == 1:
            cands.setdefault(node.name, []).append(outs[0])
    for inp in graph_inputs(model):
        cands.setdefault(inp.name, [inp.name])
    for node in model.graph.node:
        for o in node.output:
            if o:
                cands.setdefault(o, [o])
    return cands


def deepen_model(model: onnx.ModelProto, *, after, block: str = "conv-bn-relu", kernel=3, seed: int = 0,
                 shapes: dict | None = None, check: bool = True, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, batches=3,
                 providers=None, progress=None) -> tuple:
    """Net2DeeperNet on an ONNX model; returns ``(deepened ModelProto, DeepenReport)``.  ``model`` is not changed."""
    spec = core.block_spec(block, kernel)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, not {seed!r}")
    say = progress or (lambda s: None)
    src = prepare(model)
    chosen = core.select_names(insertion_candidates(src), after, "node or value")
    specs = input_specs(src, shapes)
    feeds = random_feeds(specs, seed)
    say("reading the shapes at the insertion points ...")
    values = probe_values(src, feeds, [v for _, v in chosen], providers=providers)
    signs = nonneg_signs(src)
    outputs = {o.name for o in src.graph.output}
    inputs = {i.name for i in graph_inputs(src)}
    plans = []
    for name, value in chosen:
        where = f"the output of '{name}'" if name != value else f"the value '{name}'"
        arr = values[value]
        if not isinstance(arr, np.ndarray) or arr.dtype not in (np.float32, np.float64, np.float16):
            raise InvalidArgumentError(f"{where} is not a floating-point tensor; blocks go on activations")
        form = core.block_form(spec, arr.ndim, where)
        sign = signs.get(value, Sign.no(f"the value '{value}'"))
        if spec.block == "conv-bn-relu" and not sign.nonneg:
            raise InvalidArgumentError(
                f"block 'conv-bn-relu' after '{name}' would not be the identity: its input may be negative "
                f"({sign.reason}); use --block conv-bn or residual")
        if value in inputs and value in outputs:
            raise InvalidArgumentError(f"'{name}' is both a graph input and a graph output; no block can go there")
        relu = spec.block == "conv-bn-relu" or (spec.block == "linear" and sign.nonneg)
        plans.append((name, value, form, arr.shape, arr.dtype, relu, sign))

    out = onnx.ModelProto()
    out.CopyFrom(src)
    g = out.graph
    taken = {n.name for n in g.node} | {t.name for t in g.initializer} | \
        {o for n in g.node for o in n.output} | {i.name for i in g.input}
    rng = np.random.default_rng(seed)
    report = core.DeepenReport(params_before=count_params(src))
    say(f"inserting {len(plans)} block(s) ...")
    for name, value, form, shape, dtype, relu, sign in plans:
        prefix = unique_name(taken, "graphgrow_deep/" + re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_"))
        w = _BlockWriter(prefix, taken, dtype)
        nodes = list(g.node)
        producer = next((i for i, n in enumerate(nodes) if value in n.output), None)
        if producer is None:  # a graph input: the block writes a new value and the consumers move to it
            block_out = unique_name(taken, f"{value}_deep")
            write_block(w, spec, form, shape, relu, rng, value, block_out)
            for n in nodes:
                for k, v in enumerate(n.input):
                    if v == value:
                        n.input[k] = block_out
            at = 0
        else:  # the producer writes under a new name; the block writes the old one
            pre = unique_name(taken, f"{value}_pre_deep")
            n = nodes[producer]
            n.output[list(n.output).index(value)] = pre
            write_block(w, spec, form, shape, relu, rng, pre, value)
            at = producer + 1
        del g.node[:]
        g.node.extend(nodes[:at] + w.nodes + nodes[at:])
        g.initializer.extend(w.inits)
        spatial = len(shape) - 2
        report.insertions.append(Insertion(
            after=name, name=prefix, block=spec.block, form=form,
            channels=int(shape[1] if form == "conv" else shape[-1]),
            kernels=[list(k) for k in spec.stage_kernels(spatial)] if form == "conv" else [], activation=relu,
            nonneg_reason="input is non-negative" if sign.nonneg else f"input may be negative: {sign.reason}"))
    # shapes recorded for the original stay true (every block is shape-preserving) but the value renamed to
    # *_pre_deep lost its entry; drop them all and let consumers infer again
    del g.value_info[:]
    report.params_after = count_params(out)
    check_rewritten(out, "deepened")
    if check:
        say("verifying in onnxruntime ...")
        def deepen64():  # the same blocks computed in float64, checked to be `out` up to rounding
            from .precision import rounding_of, to_float64

            out64, _ = deepen_model(to_float64(src), after=after, block=block, kernel=kernel, seed=seed,
                                    shapes=shapes, check=False, providers=providers)
            problem = rounding_of(out, out64)
            if problem:
                raise VerificationError(f"the float64 deepening is not the float32 one up to rounding: {problem}")
            return out64

        rep = verify(src, out, specs, batches=batches, seed=seed, atol=atol, rtol=rtol, providers=providers,
                     feeds=feeds, candidate64=deepen64)
        report.check = rep
        require_equivalent(rep, "deepened", report)
    return out, report


__all__ = ["deepen_model", "nonneg_signs", "insertion_candidates"]
