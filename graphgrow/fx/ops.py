"""The fx op registry: which torch modules, functions and methods map to which relation.

:mod:`graphgrow.fx.labeling` (widening) reads the relation tables, :mod:`graphgrow.fx.deepen` the sign
tables (which ops give non-negative outputs, for an identity block's ReLU); the names are torch's own
objects, so a table lookup is an identity test, never a guess by name.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
MIX_MODULES = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)

ELEMENTWISE_FUNCS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus,
    F.softsign, F.logsigmoid, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    operator.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.sin, torch.cos, torch.nn.functional.hardshrink,
    torch.reciprocal, torch.sign, torch.floor, torch.ceil, torch.round, torch.expm1, torch.log1p,
}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "erf", "square", "reciprocal", "hardswish",
    "sign", "floor", "ceil", "round",
}
IDENTITY_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                   torch.clone}
IDENTITY_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
                     "cpu", "cuda", "requires_grad_"}
BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                 torch.minimum, torch.max, torch.min, operator.pow, torch.pow, torch.true_divide,
                 torch.subtract, torch.multiply,
                 # comparisons: a predicate of each element (xIELU's x > 0 choosing between two branches)
                 operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge, torch.le}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
                   "true_divide"}
MOVE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               torch.cat, torch.concat, torch.concatenate, torch.stack, torch.chunk, torch.split, torch.movedim,
               torch.swapaxes, torch.t, torch.unflatten, torch.channel_shuffle, F.pixel_shuffle,
               F.pixel_unshuffle, torch.narrow, torch.unbind, torch.roll}
MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
                 "movedim", "swapaxes", "t", "unflatten", "expand", "expand_as", "view_as", "reshape_as",
                 "narrow", "unbind", "repeat", "roll"}
SPLITTING_MOVES = {"view", "reshape", "unflatten", torch.reshape, torch.unflatten}
# moves whose equal pieces take the same fraction of a widened axis (tied)
PIECE_MOVES = {"chunk", "split", "unbind", torch.chunk, torch.split, torch.unbind}
# moves that keep the elements' C order (reshapes) or only permute axes: compact labels survive them
MOVE_KINDS = {**{t: "reshape" for t in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                                        torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                                        torch.unflatten)},
              **{t: "permute" for t in ("permute", "transpose", "movedim", "swapaxes", "t", torch.permute,
                                        torch.transpose, torch.movedim, torch.swapaxes, torch.t)},
              **{t: "concat" for t in (torch.cat, torch.concat, torch.concatenate)}}
REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
POOL_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
               F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
               F.interpolate, F.upsample, torch.nn.functional.pad}
SOFTMAX_FUNCS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
# functions of other libraries known to act the same on every channel, by qualified name
# (torchvision's stochastic depth drops whole samples, never single channels)
ELEMENTWISE_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth"}
NORM_FUNCS = {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize, F.rms_norm} if hasattr(F, "rms_norm") \
    else {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize}
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}


# ---------------------------------------------------------------- non-negativity (deepen)
NONNEG_SOURCE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid, nn.Softplus)
SIGN_MOVE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout)
SIGN_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle)

NONNEG_SOURCE_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", torch.sigmoid: "sigmoid",
                 F.sigmoid: "sigmoid", F.softmax: "softmax", torch.softmax: "softmax", F.hardsigmoid: "hardsigmoid",
                 F.softplus: "softplus", torch.exp: "exp", torch.abs: "abs", F.relu_: "relu", torch.relu_: "relu"}
SIGN_KIND_FUNCS = {
    operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul", operator.truediv: "div",
    torch.div: "div", torch.cat: "concat", torch.concat: "concat", torch.stack: "concat", operator.getitem: "move",
    torch.flatten: "move", torch.reshape: "move", torch.transpose: "move", torch.permute: "move",
    torch.squeeze: "move", torch.unsqueeze: "move", torch.chunk: "move", torch.split: "move",
    torch.channel_shuffle: "move", torch.max: "max", torch.maximum: "max", torch.minimum: "min", torch.min: "min",
    torch.mean: "mean", torch.sum: "sum", torch.sqrt: "sqrt", getattr: "move", F.max_pool1d: "pool", F.max_pool2d: "pool",
    F.max_pool3d: "pool", F.avg_pool1d: "pool", F.avg_pool2d: "pool", F.avg_pool3d: "pool",
    F.adaptive_avg_pool1d: "pool", F.adaptive_avg_pool2d: "pool", F.adaptive_avg_pool3d: "pool",
    F.adaptive_max_pool1d: "pool", F.adaptive_max_pool2d: "pool", F.adaptive_max_pool3d: "pool",
    F.interpolate: "resize", F.dropout: "identity", F.dropout2d: "identity", torch.clone: "identity",
}
NONNEG_SOURCE_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "softmax": "softmax", "exp": "exp",
                   "abs": "abs"}
SIGN_KIND_METHODS = {
    "view": "move", "reshape": "move", "flatten": "move", "permute": "move", "transpose": "move",
    "contiguous": "identity", "squeeze": "move", "unsqueeze": "move", "chunk": "move", "split": "move",
    "expand": "move", "repeat": "move", "__getitem__": "move", "add": "add", "mul": "mul", "div": "div",
    "mean": "mean", "sum": "sum", "max": "max", "clone": "identity", "to": "identity", "float": "identity",
    "type_as": "identity", "sqrt": "sqrt", "add_": "add", "mul_": "mul",
}
# ops whose non-tensor arguments are shapes, axes or sizes, not operands (torch.max(x, 1): 1 is a dim)
SIGN_SHAPE_ARG_KINDS = {"move", "pool", "resize", "concat", "mean", "sum", "identity", "sqrt", "max", "min"}


SIZE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


def qualified_name(target) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' at node '{node.name}'"
    return f"function '{qualified_name(node.target)}' at node '{node.name}'"


