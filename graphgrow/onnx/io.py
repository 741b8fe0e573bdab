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
    try:
        return model.ByteSize() < limit
    except Exception:  # noqa: BLE001 - upb refuses to size a message over 2 GB at all
        return False


def _external_tensors(model):
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            yield t


def is_binary_onnx(path: str) -> bool:
    """Whether ``path`` names a binary (protobuf) ONNX file, the format onnxruntime reads, by its extension."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(os.fspath(path))[1])
    return fmt in (None, "protobuf")


# the typed repeated field that holds each element type's values when raw_data is not used, and how many
# entries of it one element takes (complex numbers: two)
_TYPED_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1), TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1),
}


def _tensor_problem(t: TensorProto) -> str:
    """"" when ``t``'s data fits its element type and dims (or it lives in an external file), else why not."""
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension {list(t.dims)}"
    n = 1
    for d in t.dims:
        n *= int(d)
    try:
        name = TensorProto.DataType.Name(t.data_type)
    except ValueError:
        return f"has an unknown element type {t.data_type}"
    if t.data_type == TensorProto.UNDEFINED:
        return "has no element type"
    if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
        return ""  # checked against its file when it is read
    if t.HasField("segment"):
        return "is segmented, which graphgrow does not read"
    if t.raw_data:
        if t.data_type == TensorProto.STRING:
            return "holds raw_data, which a string tensor cannot"
        try:
            bits = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
        except Exception:  # noqa: BLE001 - a type numpy has no dtype for
            return f"has element type {name}, which graphgrow does not read"
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4) or "FLOAT4" in name:
            bits = 4
        want = (n * bits + 7) // 8
        if len(t.raw_data) != want:
            return f"holds {len(t.raw_data)} bytes of raw data, but {name} {list(t.dims)} takes {want}"
        return ""
    field, per = _TYPED_FIELD.get(t.data_type, ("int32_data", 1))
    got = len(getattr(t, field))
    if got != n * per:
        return f"holds {got} values in {field}, but {name} {list(t.dims)} takes {n * per}"
    return ""


def _graphs(g):
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def check_tensors(model: onnx.ModelProto, path: str) -> None:
    """Every initializer and constant's data fits its dims and element type (the ONNX checker does not
    look): ModelFileError naming the first that does not."""
    for g in _graphs(model.graph):
        tensors = [(t, "initializer") for t in g.initializer]
        tensors += [(s.values, "sparse initializer") for s in g.sparse_initializer]
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append((a.t, f"constant of node {node.name or node.op_type!r}"))
        for t, what in tensors:
            problem = _tensor_problem(t)
            if problem:
                raise ModelFileError(f"{path}: {what} {t.name!r} {problem}")


def _text_problem(msg, where: str = "") -> str:
    """"" when every string field of ``msg`` (names, op types, domains, ...) is text; protobuf hands a
    string field with bytes that are not UTF-8 back as ``bytes``."""
    for fd, value in msg.ListFields():
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if fd.type == fd.TYPE_STRING:
            for v in (value if repeated else [value]):
                if not isinstance(v, str):
                    return f"{where}{fd.name} {v[:40]!r}"
        elif fd.type == fd.TYPE_MESSAGE and fd.message_type.name != "TensorProto":
            for v in (value if repeated else [value]):
                problem = _text_problem(v, where)
                if problem:
                    return problem
        elif fd.type == fd.TYPE_MESSAGE:  # tensors: their names and external data entries only
            for v in (value if repeated else [value]):
                for name in [v.name, v.doc_string] + [x for e in v.external_data for x in (e.key, e.value)]:
                    if not isinstance(name, str):
                        return f"{where}tensor name {name[:40]!r}"
    return ""


def check_text(model: onnx.ModelProto, path: str) -> None:
    """Names, op types and other text fields are UTF-8 text (a damaged file can hold other bytes there)."""
    problem = _text_problem(model)
    if problem:
        raise ModelFileError(f"{path} is damaged: the text field {problem} is not UTF-8")


def check_opsets(model: onnx.ModelProto, path: str) -> None:
    """The default-domain opset is one this onnx knows (1 .. its newest)."""
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= newest:
            raise ModelFileError(f"{path} imports opset {o.version} of the default domain; this onnx knows "
                                 f"opsets 1 to {newest}")


def copy_fields(dst, src, skip=()):
    """Copy every set field of the protobuf message ``src`` into ``dst`` but those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_LIGHT_MAX_ELEMENTS = 64


def light_model(model) -> onnx.ModelProto:
    """The model without its large floating-point initializers, which become graph inputs of the same
    type and shape: shape inference and the checker read only their types (values matter to data
    propagation of shape computations, which use small integer constants, kept).  Saves serializing the
    weights to onnx's C++ side and back.  A value whose shape would have needed a dropped tensor's data is
    left unknown (the engine asks onnxruntime for those)."""
    light = onnx.ModelProto()
    copy_fields(light, model, skip=("graph",))
    g = model.graph
    copy_fields(light.graph, g, skip=("initializer",))
    declared = {i.name for i in g.input}
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        if t.data_type in _FLOATS and n > _LIGHT_MAX_ELEMENTS:
            if t.name not in declared:
                light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.graph.initializer.append(t)
    return light


def _check_types(model: onnx.ModelProto, path: str) -> None:
    """Strict type and shape inference on the model without its large weights (they become typed graph
    inputs; small constants stay, shape computations read them): a node fed the wrong element type, or
    declared shapes its computation contradicts, is refused."""
    try:
        onnx.shape_inference.infer_shapes(light_model(model), check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path} is inconsistent: {first_line(exc)}") from None


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
    if check:
        check_text(model, path)
        check_opsets(model, path)
        check_tensors(model, path)
    external = list(_external_tensors(model))
    if not external and data is not None:
        if check:
            try:
                # the file's bytes are the serialized model: check them as they are (no re-serialization)
                onnx.checker.check_model(path if len(data) > TWO_GB else data)
            except Exception as exc:  # noqa: BLE001
                raise ModelFileError(f"{path} fails the ONNX checker: {first_line(exc)}") from None
            _check_types(model, path)
        return model
    data = None  # (the model's bytes without its external data: not needed further)
    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    for t in external:
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([real_base, target]) != real_base:
            raise ModelFileError(f"{path}: external data of tensor {t.name!r} points outside the model's folder ({loc})")
        if not os.path.isfile(target) or not os.path.isfile(os.path.join(base, loc)):
            # (the second: the path as the OS resolves it, which onnxruntime does: "sub/../w.bin" needs sub/)
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
        check_tensors(model, path)  # (the external data is in the tensors now)
        _check_types(model, path)
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
