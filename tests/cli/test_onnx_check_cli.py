"""`graphgrow check REF.onnx CAND.onnx`: exit codes, table / JSON output, input handling, no torch import.

Models are built with onnx.helper (no torch).  Most cases call ``graphgrow.cli.main(["check", ...])`` in-process
(fast); a few run ``python -m graphgrow check`` in a subprocess to see the real stderr / exit status and sys.modules.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgrow import cli
from graphgrow.cli import check as check_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------------------------------------


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
            "B": rng.standard_normal(4).astype(np.float32) * 0.1,
            "W2": rng.standard_normal((5, 4)).astype(np.float32) * 0.5,
            "B2": rng.standard_normal(5).astype(np.float32) * 0.1}


def make_cnn(path, *, weights=None, input_name="x", output_name="y", extra_output=False, weights_as_inputs=False,
             batch_dim="N", elem_type=TensorProto.FLOAT):
    """Conv + Relu + GlobalAveragePool + Flatten + Gemm on x[N,3,8,8] -> y[N,5]."""
    w = weights or _weights()
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes = [helper.make_node("Conv", [input_name, "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2", "B2"], [output_name], transB=1)]
    inputs = [helper.make_tensor_value_info(input_name, elem_type, [batch_dim, 3, 8, 8])]
    if weights_as_inputs:  # old exporters list the weights as graph inputs too
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in w.items()]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, 5])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [batch_dim, 4]))
    graph = helper.make_graph(nodes, "cnn", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def make_identity(path, elem_type):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", elem_type, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", elem_type, ["N", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("check_models")
    w = _weights()
    bad = {k: v.copy() for k, v in w.items()}
    bad["W"][0, 0, 1, 1] += 0.5
    return {
        "ref": make_cnn(d / "ref.onnx"),
        "same": make_cnn(d / "same.onnx"),
        "perturbed": make_cnn(d / "perturbed.onnx", weights=bad),
        "renamed_in": make_cnn(d / "renamed_in.onnx", input_name="input"),
        "renamed_out": make_cnn(d / "renamed_out.onnx", output_name="logits"),
        "two_out": make_cnn(d / "two_out.onnx", extra_output=True),
        "old_style": make_cnn(d / "old_style.onnx", weights_as_inputs=True),
        "dir": str(d),
    }


def run_main(capsys, *argv):
    """``graphgrow check`` in-process -> (exit code, stdout, stderr)."""
    try:
        code = cli.main(["check"] + [str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "graphgrow", "check", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphgrow: error: "), err
    for w in words:
        assert w in err, err


# --------------------------------------------------------------------------------------------------------------------
# verdicts and output formats
# --------------------------------------------------------------------------------------------------------------------


def test_identical_models_exit_0_with_table(models):
    r = run_cli(models["ref"], models["same"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["output", "shape", "max_abs", "max_rel", "cosine", "ok"]
    assert lines[2].split()[0] == "y" and lines[2].split()[1] == "1x5" and lines[2].split()[-1] == "ok"
    assert lines[-1].startswith("equivalent: 1 output")
    assert r.stderr == ""  # no progress lines when stderr is piped


def test_perturbed_weight_exit_1(models, capsys):
    code, out, err = run_main(capsys, models["ref"], models["perturbed"])
    assert code == 1, err
    assert "FAIL" in out and "NOT equivalent" in out
    assert err == ""


def test_json_output(models, capsys):
    code, out, _ = run_main(capsys, models["ref"], models["same"], "--json", "--batches", "2")
    assert code == 0
    d = json.loads(out)
    assert d["equivalent"] is True and d["passed"] is True and d["batches"] == 2
    assert d["outputs"][0]["name"] == "y" and d["outputs"][0]["max_abs"] == 0.0
    assert d["input_shapes"] == {"x": [1, 3, 8, 8]} and d["providers"] == ["CPUExecutionProvider"]

    code, out, _ = run_main(capsys, models["ref"], models["perturbed"], "--json")
    assert code == 1
    d = json.loads(out)
    assert d["equivalent"] is False and d["passed"] is False and d["outputs"][0]["passed"] is False
    assert d["outputs"][0]["max_rel"] > 1e-3


def test_tolerance_options_change_verdict(models, capsys):
    code, _, _ = run_main(capsys, models["ref"], models["perturbed"], "--atol", "100", "--rtol", "0")
    assert code == 0
    code, _, err = run_main(capsys, models["ref"], models["same"], "--atol", "-1")
    assert_one_line_error(code, err, "atol")


def test_output_names_may_differ_report_uses_reference_names(models, capsys):
    code, out, err = run_main(capsys, models["ref"], models["renamed_out"])
    assert code == 0, err
    assert out.splitlines()[2].split()[0] == "y"


def test_initializers_listed_as_inputs_are_ignored(models, capsys):
    code, _, err = run_main(capsys, models["old_style"], models["ref"])
    assert code == 0, err


# --------------------------------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------------------------------


def test_unreadable_files_exit_2_one_line(models, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not a protobuf\x13\x37" * 10)
    data = open(models["ref"], "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    for cand, word in [(tmp_path / "missing.onnx", "no such file"), (garbage, "garbage.onnx"),
                       (truncated, "truncated.onnx")]:
        r = run_cli(models["ref"], cand)
        assert_one_line_error(r.returncode, r.stderr, word)
        assert r.stdout == ""


# --------------------------------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------------------------------


def test_input_names_differ_exit_2(models, capsys):
    code, _, err = run_main(capsys, models["ref"], models["renamed_in"])
    assert_one_line_error(code, err, "'x'", "'input'", "inputs differ")


def test_input_types_differ_exit_2(tmp_path, capsys):
    a = make_identity(tmp_path / "f32.onnx", TensorProto.FLOAT)
    b = make_identity(tmp_path / "f64.onnx", TensorProto.DOUBLE)
    code, _, err = run_main(capsys, a, b)
    assert_one_line_error(code, err, "'x'", "float", "double")


def test_output_count_differs_exit_2(models, capsys):
    code, _, err = run_main(capsys, models["ref"], models["two_out"])
    assert_one_line_error(code, err, "numbers of outputs", "reference 1", "candidate 2")


# --------------------------------------------------------------------------------------------------------------------
# shapes and inputs
# --------------------------------------------------------------------------------------------------------------------


def test_shape_sets_dynamic_dim(models, capsys):
    code, out, err = run_main(capsys, models["ref"], models["same"], "--shape", "x=3x3x8x8", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["input_shapes"] == {"x": [3, 3, 8, 8]} and d["outputs"][0]["shape"] == [3, 5]


@pytest.mark.parametrize("shape, words", [
    ("x3x3x8x8", ["malformed"]),            # no '='
    ("x=2xax8x8", ["malformed"]),           # not a number
    ("x=2x-3x8x8", ["malformed"]),
    ("nope=1x3x8x8", ["no input 'nope'"]),  # unknown input
    ("x=2x3x8", ["rank 3", "rank 4"]),      # wrong rank
    ("x=2x4x8x8", ["fixed dimensions"]),    # contradicts a static dim
])
def test_bad_shape_exit_2(models, capsys, shape, words):
    code, out, err = run_main(capsys, models["ref"], models["same"], "--shape", shape)
    assert_one_line_error(code, err, *words)
    assert out == ""


def test_inputs_npz_first_batch(models, tmp_path, capsys):
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=x)
    code, out, err = run_main(capsys, models["ref"], models["same"], "--inputs", npz, "--json", "--batches", "2")
    assert code == 0, err
    d = json.loads(out)
    assert d["input_shapes"] == {"x": [2, 3, 8, 8]} and d["batches"] == 2  # later random batches follow the npz

    # the npz batch alone (--batches 1) already reveals the perturbation
    code, _, err = run_main(capsys, models["ref"], models["perturbed"], "--inputs", npz, "--batches", "1")
    assert code == 1, err


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.zeros((2, 4, 8, 8), np.float32)}, ["shape [2, 4, 8, 8]"]),
    ({"x": np.zeros((2, 3, 8), np.float32)}, ["shape [2, 3, 8]"]),
    ({"x": np.zeros((2, 3, 8, 8), np.float64)}, ["dtype float64"]),
    ({"input": np.zeros((2, 3, 8, 8), np.float32)}, ["missing 'x'", "unknown 'input'"]),
])
def test_inputs_npz_mismatch_exit_2(models, tmp_path, capsys, arrays, words):
    npz = tmp_path / "bad.npz"
    np.savez(npz, **arrays)
    code, _, err = run_main(capsys, models["ref"], models["same"], "--inputs", npz)
    assert_one_line_error(code, err, *words)


def test_inputs_npz_unreadable_exit_2(models, tmp_path, capsys):
    code, _, err = run_main(capsys, models["ref"], models["same"], "--inputs", tmp_path / "nope.npz")
    assert_one_line_error(code, err, "no such file")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    code, _, err = run_main(capsys, models["ref"], models["same"], "--inputs", junk)
    assert_one_line_error(code, err, "junk.npz")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((1, 3, 8, 8), np.float32))
    code, _, err = run_main(capsys, models["ref"], models["same"], "--inputs", single)
    assert_one_line_error(code, err, "single array")


def test_named_dim_set_by_shape_applies_to_other_inputs(tmp_path, capsys):
    # Concat on axis 1 needs x and z to agree on N: --shape x=3x4 must give z N=3 as well
    graph = helper.make_graph([helper.make_node("Concat", ["x", "z"], ["y"], axis=1)], "cat",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "cat.onnx"
    onnx.save(model, str(path))
    code, out, err = run_main(capsys, path, path, "--shape", "x=3x4", "--json", "--batches", "1")
    assert code == 0, err
    assert json.loads(out)["input_shapes"] == {"x": [3, 4], "z": [3, 2]}


def test_bad_batches_exit_2(models, capsys):
    code, _, err = run_main(capsys, models["ref"], models["same"], "--batches", "0")
    assert_one_line_error(code, err, "--batches")


# --------------------------------------------------------------------------------------------------------------------
# providers, onnxruntime failures
# --------------------------------------------------------------------------------------------------------------------


def test_cuda_unavailable_exit_2(models, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    code, _, err = run_main(capsys, models["ref"], models["same"], "--provider", "cuda")
    assert_one_line_error(code, err, "CUDA", "--provider cpu")


def test_onnxruntime_session_failure_exit_2(tmp_path, capsys):
    # passes the ONNX checker (unknown custom domain) but onnxruntime cannot build a session for it
    graph = helper.make_graph([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    ref = make_identity(tmp_path / "id.onnx", TensorProto.FLOAT)
    code, _, err = run_main(capsys, ref, path)
    assert_one_line_error(code, err, "candidate", "onnxruntime")


def test_onnxruntime_run_failure_exit_2(tmp_path):
    # valid model whose Reshape fails at run time for a 1x3x8x8 input (192 elements not divisible by 5)
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
                              [numpy_helper.from_array(np.array([5, -1], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "reshape.onnx"
    onnx.save(model, str(path))
    ref = make_identity(tmp_path / "id.onnx", TensorProto.FLOAT)
    r = run_cli(ref, path)  # subprocess: onnxruntime's own logger must not add lines to stderr
    assert_one_line_error(r.returncode, r.stderr, "failed to run the candidate", "batch 1")


# --------------------------------------------------------------------------------------------------------------------
# wiring and the no-torch guarantee
# --------------------------------------------------------------------------------------------------------------------


def test_add_check_parser_wires_subcommand(models, capsys):
    parser = argparse.ArgumentParser(prog="graphgrow")
    check_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", models["ref"], models["same"], "--batches", "1"])
    assert args.func is check_command.run
    assert args.func(args) == 0
    assert "equivalent" in capsys.readouterr().out
    help_text = parser._subparsers._group_actions[0].choices["check"].format_help()
    assert "default to 1" in help_text or "are 1 unless" in help_text


_NO_TORCH = r"""
import runpy, sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _BlockTorch())
sys.argv = ["graphgrow", "check"] + sys.argv[1:]
try:
    runpy.run_module("graphgrow", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
print("NO-TORCH-OK", code)
sys.exit(code)
"""


def test_check_path_never_imports_torch(models):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, models["ref"], models["perturbed"], "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH-OK 1")
    assert json.loads(r.stdout[: r.stdout.rindex("NO-TORCH-OK")])["equivalent"] is False
