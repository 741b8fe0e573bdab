"""The ONNX op registry: which operators map to which relation (no torch).

:mod:`graphgrow.onnx.labeling` (widening) reads the relation tables, :mod:`graphgrow.onnx.deepening` the
sign tables (which ops give non-negative outputs, for an identity block's ReLU).
"""

from __future__ import annotations

import onnx

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
         "Softplus", "Softsign", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil",
         "Round", "Sign", "ThresholdedRelu", "Sin", "Cos", "Clip", "Swish", "Shrink"}
UNARY |= {"Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
          "IsNaN", "IsInf", "Not", "BitwiseNot"}  # (predicates: a boolean per element)
PASS = {"Identity", "Dropout", "Cast", "CastLike"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
          # comparisons and logic (exported attention masks): one result per element pair, as for Add
          "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd",
          "BitwiseOr", "BitwiseXor", "Mod", "BitShift"}
POSITIONAL = {"Trilu", "CumSum"}  # per channel while the axes they act along are position axes
# ops whose result has no channel structure when no input has any (masks and positions computed from token
# ids); SHAPE_OF_INPUTS: those whose result has the broadcast shape of their inputs
SHAPE_OF_INPUTS = UNARY | PASS | BINARY | POSITIONAL | {"Where", "PRelu", "Softmax", "LogSoftmax"}
CONSTANT_CLOSED = SHAPE_OF_INPUTS | {"Range", "ConstantOfShape", "Hardmax", "ArgMax", "ArgMin", "OneHot", "EyeLike"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # moves that keep the elements' C order
MOVE = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather",
        "Expand", "DepthToSpace", "SpaceToDepth", "Tile"}
POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Resize",
        "Upsample", "Pad"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceProd", "ReduceSumSquare", "ReduceLogSum"}
MIX = {"GroupNormalization", "LRN", "LpNormalization", "MeanVarianceNormalization"}
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
# element types numpy holds as they are (no bfloat16, float8, 4-bit or string)
PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64,
               onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
               onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

# ---------------------------------------------------------------- non-negativity (deepen)
# ops whose output is non-negative for any input
NONNEG_SOURCES = {"Relu": "relu", "Sigmoid": "sigmoid", "Softmax": "softmax", "HardSigmoid": "hardsigmoid",
               "Softplus": "softplus", "Exp": "exp", "Abs": "abs"}
# ops whose sign is their first (data) input's
SIGN_OF_DATA = {"Reshape": "move", "Flatten": "move", "Transpose": "move", "Squeeze": "move", "Unsqueeze": "move",
             "Split": "move", "Slice": "move", "Gather": "move", "Identity": "identity", "Dropout": "identity",
             "Expand": "move", "Tile": "move", "DepthToSpace": "move", "SpaceToDepth": "move", "Cast": "identity",
             "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool", "GlobalMaxPool": "pool",
             "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "mean", "ReduceMin": "mean", "Sqrt": "sqrt",
             "Resize": "resize", "Upsample": "resize"}
# ops whose sign follows all of their inputs
SIGN_OF_ALL = {"Concat": "concat", "Add": "add", "Mul": "mul", "Div": "div", "Sum": "sum", "Mean": "mean",
            "Min": "min", "Max": "max"}
