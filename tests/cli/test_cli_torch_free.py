"""`graphgrow widen|deepen|inspect|check` on small ONNX graphs built with onnx.helper: exit codes 0/1/2, one line
on stderr for every failure, nothing written, the input untouched.  Needs no torch (runs in the torch-free CI
environment too)."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from tiny_onnx import tiny_cnn

from graphgrow import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_cnn(path, seed=0):
    onnx.save(tiny_cnn(seed), str(path))
    return path


@pytest.fixture
def model(tmp_path):
    return make_cnn(tmp_path / "m.onnx")


def run(capsys, *argv):
    """``graphgrow ARGV`` in-process -> (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files(folder):
    return {p: os.path.getsize(os.path.join(folder, p)) for p in sorted(os.listdir(folder))}


def refused(capsys, folder, source, *argv, code=2):
    """Run a command that must fail: exit ``code``, one line on stderr, no file added or changed, input untouched."""
    before, data = files(folder), source.read_bytes()
    got, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    assert files(folder) == before and source.read_bytes() == data
    return lines[0]


def test_widen_writes_a_verified_model_and_report(model, tmp_path, capsys):
    out, rep = tmp_path / "w.onnx", tmp_path / "r.json"
    code, stdout, err = run(capsys, "widen", model, "--factor", "1.5", "-o", out, "--report", rep)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("2/3 channel spaces widened, 1 frozen; params 318 -> 720; equivalent")
    d = json.loads(rep.read_text())
    assert [(s["name"], s["old_width"], s["new_width"]) for s in d["spaces"]] == [("c1", 6, 9), ("c2", 5, 8),
                                                                                  ("head", 4, 4)]
    assert d["check"]["passed"] and d["check"]["outputs"][0]["max_rel"] <= 1e-5
    assert [i.name for i in onnx.load(str(out)).graph.initializer if i.name == "w2"] == ["w2"]
    assert list(onnx.load(str(out)).graph.initializer[2].dims) == [8, 9, 3, 3]
    code, stdout, _ = run(capsys, "check", model, out)
    assert code == 0 and "equivalent: 1 output" in stdout


def test_widen_not_equivalent_is_exit_1_and_writes_only_the_report(model, tmp_path, capsys, monkeypatch):
    # a wrong mapping (every consumer weight 0.1 % off) fails the check in float32 and in float64
    from graphgrow.core import arithmetic

    consume = arithmetic.consume
    monkeypatch.setattr(arithmetic, "consume", lambda *a, **k: consume(*a, **k) * 1.001)
    rep = tmp_path / "r.json"
    msg = refused(capsys, tmp_path, model, "widen", model, "--factor", "3", "-o", tmp_path / "w.onnx", code=1)
    assert msg.startswith("graphgrow: not equivalent, nothing written: widened model is not equivalent: output 'y'")
    code, _, _ = run(capsys, "widen", model, "--factor", "3", "-o", tmp_path / "w.onnx", "--report", rep)
    assert code == 1 and not (tmp_path / "w.onnx").exists()
    assert json.loads(rep.read_text())["check"]["passed"] is False


@pytest.mark.parametrize("args, words", [
    (["--factor", "0.5"], "factor"),
    (["--only", "nomatch"], "nomatch"),
    (["--shape", "nope=1x3"], "nope"),
    (["--shape", "x3"], "malformed"),
    (["--batches", "0"], "--batches must be a positive integer"),
    (["--width", "c1=abc"], "not an integer"),
    (["--exclude", ".*"], "nothing can be widened"),
])
def test_widen_bad_options_exit_2(model, tmp_path, capsys, args, words):
    msg = refused(capsys, tmp_path, model, "widen", model, *args, "-o", tmp_path / "w.onnx")
    assert msg.startswith("graphgrow: error: ") and words in msg


def test_widen_bad_paths_exit_2(model, tmp_path, capsys):
    assert "no such file" in refused(capsys, tmp_path, model, "widen", tmp_path / "missing.onnx")
    assert "does not exist" in refused(capsys, tmp_path, model, "widen", model, "-o", tmp_path / "no" / "w.onnx")
    assert "is the input file" in refused(capsys, tmp_path, model, "widen", model, "-o", model)
    assert "is the input file" in refused(capsys, tmp_path, model, "widen", model, "--report", model)
    # a bad --report path is refused before anything is written
    assert "does not exist" in refused(capsys, tmp_path, model, "widen", model, "--report", tmp_path / "no" / "r.json")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model" * 10)
    assert "junk.onnx" in refused(capsys, tmp_path, junk, "widen", junk, "-o", tmp_path / "w.onnx")


def test_deepen(model, tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code, stdout, err = run(capsys, "deepen", model, "--after", "relu1", "--kernel", "1x3+3x1", "-o", out)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("1 block(s) inserted (conv-bn-relu); params 318 -> 582; equivalent")
    deep = onnx.load(str(out))
    assert [n.op_type for n in deep.graph.node].count("Conv") == 4
    assert run(capsys, "check", model, out)[0] == 0
    msg = refused(capsys, tmp_path, model, "deepen", model, "--after", "c1", "-o", tmp_path / "d2.onnx")
    assert "may be negative" in msg
    assert "matches no node or value" in refused(capsys, tmp_path, model, "deepen", model, "--after", "nope",
                                                 "-o", tmp_path / "d2.onnx")
    assert "not a positive odd number" in refused(capsys, tmp_path, model, "deepen", model, "--after", "relu1",
                                                  "--kernel", "4", "-o", tmp_path / "d2.onnx")


def test_inspect(model, tmp_path, capsys):
    code, stdout, _ = run(capsys, "inspect", model, "--json")
    assert code == 0
    d = json.loads(stdout)
    assert [(s["name"], s["old_width"], s["frozen_reasons"] != []) for s in d["spaces"]] == \
        [("c1", 6, False), ("c2", 5, False), ("head", 4, True)]
    assert d["groups"] == [] and d["params_before"] == 318
    dot = tmp_path / "g.dot"
    code, stdout, _ = run(capsys, "inspect", model, "--dot", dot)
    assert code == 0 and stdout.splitlines()[-1] == "3 channel spaces, 2 widenable, 1 frozen; 0 coupled groups; params 318"
    assert dot.read_text().startswith("graph channel_spaces {")
    assert "does not exist" in refused(capsys, tmp_path, model, "inspect", model, "--dot", tmp_path / "no" / "g.dot")


def test_check_exit_codes(model, tmp_path, capsys):
    other = make_cnn(tmp_path / "other.onnx", seed=1)
    assert run(capsys, "check", model, model)[0] == 0
    code, stdout, _ = run(capsys, "check", model, other, "--json")
    assert code == 1 and json.loads(stdout)["equivalent"] is False
    assert "no such file" in refused(capsys, tmp_path, model, "check", model, tmp_path / "missing.onnx")


def test_subprocess_no_torch_one_line(model, tmp_path):
    """The real process: exit code, a single stderr line, and torch never imported on the ONNX path."""
    code = ("import sys; from graphgrow.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv, want in [(["widen", model, "-o", tmp_path / "w.onnx"], 0), (["inspect", model], 0),
                       (["deepen", model, "--after", "relu2", "-o", tmp_path / "d.onnx"], 0),
                       (["check", model, tmp_path / "w.onnx"], 0), (["widen", model, "--factor", "0.5"], 2)]:
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=300)
        assert r.returncode == want, r.stderr
        if want == 2:
            assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("graphgrow: error: ")
