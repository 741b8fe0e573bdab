"""Loading and saving ONNX files with one clear error per problem, and atomic writes."""

from __future__ import annotations

import os
import tempfile

import onnx
from onnx import TensorProto

from ..errors import InvalidArgumentError, ModelFileError

TWO_GB = 2**31 - 1024 * 1024


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _external_tensors(model):
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            yield t


def load_model(path: str, *, check: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX model (external data resolved inside the model's folder)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or another format): {_first_line(exc)}") \
            from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelFileError(f"{path} is not an ONNX model (no graph found)")
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    for t in _external_tensors(model):
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([real_base, target]) != real_base:
            raise ModelFileError(f"{path}: external data of tensor {t.name!r} points outside the model's folder ({loc})")
        if not os.path.isfile(target):
            raise ModelFileError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: cannot read its external data: {_first_line(exc)}") from None
    if check:
        try:
            if model.ByteSize() > TWO_GB:
                onnx.checker.check_model(path)
            else:
                onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{path} fails the ONNX checker: {_first_line(exc)}") from None
    return model


def check_output_path(out: str, inp: str | None = None) -> str:
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(folder):
        raise InvalidArgumentError(f"output folder {folder} does not exist")
    if os.path.isdir(out):
        raise InvalidArgumentError(f"output path {out} is a directory")
    if inp is not None and os.path.exists(out) and os.path.samefile(out, inp):
        raise InvalidArgumentError(f"output path {out} is the input file; choose another name")
    return out


def save_model(model: onnx.ModelProto, path: str) -> list:
    """Write atomically (temporary file + rename); models over 2 GB get a ``.data`` file beside them.

    Returns the paths written.
    """
    path = check_output_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".graphgrow-", suffix=".onnx", dir=folder)
    os.close(fd)
    written = [path]
    try:
        if model.ByteSize() > TWO_GB or any(True for _ in _external_tensors(model)):
            data_name = os.path.basename(path) + ".data"
            tmp_data = tmp + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(tmp_data), size_threshold=1024)
            # point the model at the final data file name, then move both into place
            m = onnx.load(tmp, load_external_data=False)
            for t in _external_tensors(m):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(m, tmp)
            os.replace(tmp_data, os.path.join(folder, data_name))
            written.append(os.path.join(folder, data_name))
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        for f in (tmp, tmp + ".data"):
            if os.path.exists(f):
                os.remove(f)
        raise
    return written
