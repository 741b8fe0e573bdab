"""Loading and saving ONNX files with one clear error per problem, and atomic writes."""

from __future__ import annotations

import os
import tempfile

import onnx
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import TensorProto

from ..errors import InvalidArgumentError, ModelFileError, first_line

TWO_GB = 2**31 - 1024 * 1024


_TAG_LEN = 15  # a field's tag (<= 5 bytes) and length prefix (<= 10 bytes)


def _size_bound(msg) -> int:
    """An upper bound of ``msg``'s serialized size, without serializing it (``ByteSize`` encodes the whole
    message, a second of work for a few hundred MB of weights): every set field counts its content plus
    15 bytes of tag and length; scalars count 10 bytes each; a str 4 bytes per character (UTF-8's most).
    Messages with fields this protobuf schema does not know are measured exactly."""
    if len(UnknownFieldSet(msg)):
        return msg.ByteSize()
    total = 0
    for fd, value in msg.ListFields():
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if fd.type == fd.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                return msg.ByteSize()
            total += sum(_TAG_LEN + _size_bound(v) for v in value) if repeated else _TAG_LEN + _size_bound(value)
        elif fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES):
            items = value if repeated else [value]
            total += sum(_TAG_LEN + (len(v) if isinstance(v, bytes) else 4 * len(v)) for v in items)
        else:
            total += _TAG_LEN + 10 * (len(value) if repeated else 1)
    return total


def serialized_size_below(model, limit: int | None = None) -> bool:
    """Whether ``model`` serializes to fewer than ``limit`` (default: the 2 GB protobuf limit) bytes.

    Decided by a cheap upper bound when it is clearly below; only a model near or over the limit is
    measured exactly (``ByteSize``)."""
    limit = TWO_GB if limit is None else limit
    if _size_bound(model) < limit:
        return True
    return model.ByteSize() < limit


def _external_tensors(model):
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            yield t


def is_binary_onnx(path: str) -> bool:
    """Whether ``path`` names a binary (protobuf) ONNX file, the format onnxruntime reads, by its extension."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(os.fspath(path))[1])
    return fmt in (None, "protobuf")


def load_model(path: str, *, check: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX model (external data resolved inside the model's folder)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a directory, not an ONNX file")
    try:
        if is_binary_onnx(path):
            with open(path, "rb") as f:
                data = f.read()
            model = onnx.ModelProto.FromString(data)
        else:  # a text format onnx knows by the file's extension
            data = None
            model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or another format): {first_line(exc)}") \
            from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelFileError(f"{path} is not an ONNX model (no graph found)")
    external = list(_external_tensors(model))
    if not external and data is not None:
        if check:
            try:
                # the file's bytes are the serialized model: check them as they are (no re-serialization)
                onnx.checker.check_model(path if len(data) > TWO_GB else data)
            except Exception as exc:  # noqa: BLE001
                raise ModelFileError(f"{path} fails the ONNX checker: {first_line(exc)}") from None
        return model
    data = None  # (the model's bytes without its external data: not needed further)
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    for t in external:
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([real_base, target]) != real_base:
            raise ModelFileError(f"{path}: external data of tensor {t.name!r} points outside the model's folder ({loc})")
        if not os.path.isfile(target):
            raise ModelFileError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: cannot read its external data: {first_line(exc)}") from None
    if check:
        try:
            if not serialized_size_below(model):
                onnx.checker.check_model(path)
            else:
                onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{path} fails the ONNX checker: {first_line(exc)}") from None
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


def _new_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0666 less the umask): the
    temporary file of an atomic write is created 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_model(model: onnx.ModelProto, path: str, data: bytes | None = None) -> list:
    """Write atomically (temporary file + rename); models over 2 GB get a ``.data`` file beside them.

    ``data``: ``model.SerializeToString()`` when the caller already has it (written as is).
    Returns the paths written.
    """
    path = check_output_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".graphgrow-", suffix=".onnx", dir=folder)
    os.close(fd)
    written = [path]
    try:
        external = any(True for _ in _external_tensors(model))
        if data is not None and not external:
            with open(tmp, "wb") as f:
                f.write(data)
        elif external or not serialized_size_below(model):
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
            os.chmod(tmp_data, _new_file_mode())
            os.replace(tmp_data, os.path.join(folder, data_name))
            written.append(os.path.join(folder, data_name))
        else:
            onnx.save_model(model, tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        for f in (tmp, tmp + ".data"):
            if os.path.exists(f):
                os.remove(f)
        raise
    return written
