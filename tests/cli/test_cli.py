"""CLI: --help, the demo on the bundled default, exit codes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the demo widens a torch model")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "graphgrow", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout


def test_no_command_is_usage_error():
    assert run().returncode == 2


@requires_torch
def test_demo_default_verifies(tmp_path):
    rep = tmp_path / "report.json"
    r = run("demo", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert "equivalent" in r.stdout and "NOT" not in r.stdout
    d = json.loads(rep.read_text())
    assert d["params_after"] > 1.8 * d["params_before"]
    assert d["onnxruntime_check"]["outputs"][0]["max_rel"] <= 1e-4


@requires_torch
def test_demo_bad_model_is_one_line_exit_2():
    r = run("demo", "--model", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown zoo model" in r.stderr


@requires_torch
def test_demo_bad_factor_exit_2():
    r = run("demo", "--factor", "0.5")
    assert r.returncode == 2 and "factor" in r.stderr and "Traceback" not in r.stderr
