"""Malformed ONNX files never end in a traceback: a seeded mutation test over small valid graphs.

Each mutant (truncations, bit flips, deleted nodes/initializers, wrong dims/dtypes/raw_data lengths,
wrong or missing opsets, cycles, dangling inputs, external data escaping the model's folder ...) goes
through ``graphgrow widen``, ``inspect``, ``deepen`` and ``check`` in-process.  Every run must exit 0, 1
or 2 with no traceback; a failure is exactly one line on stderr with nothing written; the input file is
never changed; exit 0 only for a mutant that is still a valid model (it passes the ONNX checker and
onnxruntime runs it), its output verified by the command itself.  No torch needed.
"""
from __future__ import annotations

import contextlib
import io
import os
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgrow.cli import main

F = TensorProto.FLOAT


def _init(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def conv_graph() -> onnx.ModelProto:
    """conv -> BN -> relu -> (conv -> add residual) -> concat -> pool -> flatten -> gemm."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "W1", 4, 3, 3, 3), _init(rng, "B1", 4),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(4)).astype(np.float32), "s"),
             _init(rng, "b", 4), _init(rng, "m", 4),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "v"),
             _init(rng, "W2", 4, 4, 3, 3), _init(rng, "W3", 5, 8), _init(rng, "B3", 5)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
             helper.make_node("Concat", ["a", "r1"], ["cat"], name="cat", axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", F, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def mlp_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [_init(rng, "W1", 6, 4), _init(rng, "B1", 6), _init(rng, "W2", 3, 6), _init(rng, "B2", 3)]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, [2, 4])],
                          [helper.make_tensor_value_info("y", F, [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m, full_check=True)
    return m


BASES = {"conv": (conv_graph, ("relu1", "conv-bn")), "mlp": (mlp_graph, ("relu", "linear"))}


# ------------------------------------------------------------------------------------------------- mutations

def _copy(m):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def _pick_init(m, r):
    return r.choice(list(m.graph.initializer))


def m_truncate(m, r, d):
    data = m.SerializeToString()
    return data[:r.randrange(1, len(data))]


def m_bitflip(m, r, d):
    data = bytearray(m.SerializeToString())
    for _ in range(r.randint(1, 4)):
        i = r.randrange(len(data))
        data[i] ^= 1 << r.randrange(8)
    return bytes(data)


def m_delete_node(m, r, d):
    m = _copy(m)
    del m.graph.node[r.randrange(len(m.graph.node))]
    return m


def m_delete_init(m, r, d):
    m = _copy(m)
    del m.graph.initializer[r.randrange(len(m.graph.initializer))]
    return m


def m_wrong_dims(m, r, d):
    m = _copy(m)
    t = _pick_init(m, r)
    choice = r.randrange(5)
    if choice == 0:
        t.dims[r.randrange(len(t.dims))] += r.choice([-1, 1, 2])
    elif choice == 1:
        t.dims.append(r.choice([1, 2]))
    elif choice == 2:
        del t.dims[:]
    elif choice == 3:
        t.dims[0] = -t.dims[0]
    else:
        t.dims[0] = 2 ** 40
    return m


def m_wrong_dtype(m, r, d):
    m = _copy(m)
    t = _pick_init(m, r)
    t.data_type = r.choice([TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.INT8,
                            TensorProto.BOOL, TensorProto.STRING, TensorProto.UNDEFINED, 99])
    return m


def m_raw_len(m, r, d):
    m = _copy(m)
    t = _pick_init(m, r)
    raw = t.raw_data or numpy_helper.to_array(t).tobytes()
    t.ClearField("float_data")
    k = r.choice([-4, -1, 1, 4, len(raw)])
    t.raw_data = raw[:k] if k < 0 else raw + bytes(k)
    return m


def m_float_data(m, r, d):
    m = _copy(m)
    t = _pick_init(m, r)
    vals = numpy_helper.to_array(t).ravel().tolist()
    t.ClearField("raw_data")
    t.float_data.extend(vals[:-1] if r.random() < 0.5 else vals + [1.0])
    return m


def m_opset(m, r, d):
    m = _copy(m)
    choice = r.randrange(4)
    if choice == 0:
        del m.opset_import[:]
    else:
        m.opset_import[0].version = [0, 1, 99][choice - 1]
    return m


def m_ir(m, r, d):
    m = _copy(m)
    m.ir_version = r.choice([0, 1, 3, 99])
    return m


def m_cycle(m, r, d):
    m = _copy(m)
    nodes = m.graph.node
    i = r.randrange(len(nodes) - 1)
    j = r.randrange(i + 1, len(nodes))
    nodes[i].input[0] = nodes[j].output[0]
    return m


def m_dangling(m, r, d):
    m = _copy(m)
    n = r.choice(list(m.graph.node))
    n.input[r.randrange(len(n.input))] = "nowhere"
    return m


def m_output(m, r, d):
    m = _copy(m)
    choice = r.randrange(3)
    if choice == 0:
        m.graph.output[0].name = "nowhere"
    elif choice == 1:
        del m.graph.output[:]
    else:
        m.graph.node[r.randrange(len(m.graph.node))].output[0] = m.graph.node[0].output[0]
    return m


def m_attr(m, r, d):
    m = _copy(m)
    n = r.choice([n for n in m.graph.node if n.attribute] or list(m.graph.node))
    if n.attribute:
        a = n.attribute[r.randrange(len(n.attribute))]
        if a.type == onnx.AttributeProto.INTS:
            a.ints[0] = r.choice([-5, 0, 1000])
        elif a.type == onnx.AttributeProto.INT:
            a.i = r.choice([-7, 5, 1000])
    else:
        n.attribute.append(helper.make_attribute("bogus", 1))
    return m


def m_op_type(m, r, d):
    m = _copy(m)
    n = r.choice(list(m.graph.node))
    n.op_type = r.choice(["Conv", "Relu", "Gemm", "NoSuchOp", ""])
    return m


def m_input_type(m, r, d):
    m = _copy(m)
    tt = m.graph.input[0].type.tensor_type
    choice = r.randrange(3)
    if choice == 0:
        tt.elem_type = r.choice([TensorProto.INT64, TensorProto.STRING, TensorProto.DOUBLE])
    elif choice == 1:
        tt.shape.dim[0].dim_value = r.choice([0, 3])
    else:
        del tt.shape.dim[:]
    return m


def m_external(m, r, d):
    m = _copy(m)
    t = _pick_init(m, r)
    raw = numpy_helper.to_array(t).tobytes()
    loc = r.choice(["../escape.bin", "/etc/hostname", "missing.bin", "w.bin", "w.bin", "sub/../w.bin",
                    "link.bin"])
    with open(os.path.join(d, "w.bin"), "wb") as f:
        f.write(raw[: r.choice([len(raw), len(raw) // 2])])
    with open(os.path.join(os.path.dirname(d), "escape.bin"), "wb") as f:
        f.write(raw)
    if not os.path.lexists(os.path.join(d, "link.bin")):
        os.symlink(os.path.join(os.path.dirname(d), "escape.bin"), os.path.join(d, "link.bin"))
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    entries = {"location": loc}
    if r.random() < 0.5:
        entries["offset"] = str(r.choice([0, 4, 10 ** 9, -1]))
        entries["length"] = str(r.choice([len(raw), len(raw) + 4, 10 ** 12, -1]))
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return m


MUTATIONS = [m_truncate, m_bitflip, m_delete_node, m_delete_init, m_wrong_dims, m_wrong_dtype, m_raw_len,
             m_float_data, m_opset, m_ir, m_cycle, m_dangling, m_output, m_attr, m_op_type, m_input_type, m_external]


# ------------------------------------------------------------------------------------------------- running

def _is_valid(path) -> bool:
    try:
        onnx.checker.check_model(path, full_check=True)
        import onnxruntime

        so = onnxruntime.SessionOptions()
        so.log_severity_level = 4
        onnxruntime.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001
        return False


def _files(folder):
    return {os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs}


def run_cli(argv, folder):
    err, out = io.StringIO(), io.StringIO()
    before = _files(folder)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - what escaped main: a traceback for the user
            import traceback

            traceback.print_exc(file=err)
            code = "raised " + type(exc).__name__
    return code, err.getvalue(), _files(folder) - before


def check_mutant(path, folder, after, label):
    with open(path, "rb") as f:
        original = f.read()
    valid = None
    out = os.path.join(folder, "out.onnx")
    runs = [["widen", path, "-o", out, "--factor", "1.5"], ["inspect", path],
            ["deepen", path, "--after", after[0], "--block", after[1], "-o", out], ["check", path, path]]
    problems = []
    for argv in runs:
        code, err, written = run_cli(argv, folder)
        what = f"{label}: graphgrow {argv[0]} exited {code}"
        with open(path, "rb") as f:
            if f.read() != original:
                problems.append(f"{what}: the input file changed")
        if "Traceback" in err or code not in (0, 1, 2):
            problems.append(f"{what} with a traceback:\n{err}")
            continue
        if code == 0:
            if valid is None:
                valid = _is_valid(path)
            if not valid:
                problems.append(f"{what} on an invalid model: {err.strip()[:300]}")
        else:
            lines = err.strip().splitlines()
            if len(lines) != 1:
                problems.append(f"{what} with {len(lines)} stderr lines:\n{err}")
            if written:
                problems.append(f"{what} but wrote {sorted(written)}")
        for p in written:
            os.remove(p)
    return problems


def mutants(n, seed):
    r = random.Random(seed)
    for k in range(n):
        base = r.choice(sorted(BASES))
        build, after = BASES[base]
        mut = MUTATIONS[k % len(MUTATIONS)]
        yield f"#{k} {base} {mut.__name__[2:]}", build(), after, mut, random.Random(r.random())


def _run(n, seed, tmp_path):
    problems = []
    for k, (label, model, after, mut, r) in enumerate(mutants(n, seed)):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        folder = str(folder)
        m = mut(model, r, folder)
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(m if isinstance(m, bytes) else m.SerializeToString())
        problems += check_mutant(path, folder, after, label)
    return problems


def test_valid_bases_pass_every_command(tmp_path):
    for name, (build, after) in BASES.items():
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(build(), path)
        for argv in (["widen", path, "-o", str(tmp_path / "w.onnx")], ["inspect", path],
                     ["deepen", path, "--after", after[0], "--block", after[1], "-o", str(tmp_path / "d.onnx")],
                     ["check", path, path]):
            code, err, _ = run_cli(argv, str(tmp_path))
            assert code == 0, (argv, err)


def test_malformed_files_end_in_one_line(tmp_path):
    problems = _run(300, 0, tmp_path)
    assert not problems, "\n\n".join(problems[:10]) + f"\n\n({len(problems)} problems)"


@pytest.mark.slow
def test_malformed_files_end_in_one_line_many(tmp_path):
    problems = _run(3000, 2, tmp_path)
    assert not problems, "\n\n".join(problems[:10]) + f"\n\n({len(problems)} problems)"


@pytest.mark.parametrize("mutate, words", [
    (lambda t: t.dims.__setitem__(0, t.dims[0] + 1), ["initializer 'W2'", "bytes of raw data", "takes"]),
    (lambda t: setattr(t, "data_type", TensorProto.DOUBLE), ["initializer 'W2'", "DOUBLE"]),
    (lambda t: setattr(t, "raw_data", t.raw_data[:-3]), ["initializer 'W2'", "bytes of raw data"]),
])
def test_initializer_data_that_disagrees_with_its_dims_is_one_sentence(tmp_path, mutate, words):
    m = conv_graph()
    t = next(t for t in m.graph.initializer if t.name == "W2")
    mutate(t)
    path = str(tmp_path / "m.onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    for argv in (["widen", path, "-o", str(tmp_path / "w.onnx")], ["inspect", path]):
        code, err, written = run_cli(argv, str(tmp_path))
        assert code == 2 and len(err.strip().splitlines()) == 1 and not written, err
        for w in words:
            assert w in err, err


def test_names_that_are_not_utf8_are_one_sentence(tmp_path):
    data = bytearray(mlp_graph().SerializeToString())
    data[data.index(b"fc1")] = 0xFF
    path = str(tmp_path / "m.onnx")
    with open(path, "wb") as f:
        f.write(bytes(data))
    code, err, _ = run_cli(["inspect", path], str(tmp_path))
    assert code == 2 and "not UTF-8" in err and len(err.strip().splitlines()) == 1, err


def test_opset_newer_than_onnx_knows_is_refused(tmp_path):
    m = conv_graph()
    m.opset_import[0].version = 99
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    code, err, _ = run_cli(["inspect", path], str(tmp_path))
    assert code == 2 and "opset 99" in err, err
