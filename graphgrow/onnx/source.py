"""What the ONNX API accepts as a model: an ``onnx.ModelProto`` or the path of an ONNX file."""

from __future__ import annotations

import os

import onnx

from ..errors import InvalidArgumentError
from .io import load_model


def model_source(model_or_path, what: str = "model") -> tuple:
    """``(ModelProto, path or None)``; a path is loaded (and checked) by :func:`graphgrow.onnx.io.load_model`."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        return load_model(path), path
    raise InvalidArgumentError(f"{what} must be an onnx.ModelProto or the path of an ONNX file, not "
                               f"{type(model_or_path).__name__}")
