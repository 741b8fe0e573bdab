"""Packaging: every package folder is installed, the zoo installs as graphgrow.models, no import cycle,
and the ONNX path imports no torch."""

import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_dirs():
    out = set()
    for base, dirs, files in os.walk(os.path.join(ROOT, "graphgrow")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            out.add(os.path.relpath(base, ROOT).replace(os.sep, "."))
    return out


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_package_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert _package_dirs() | {"graphgrow.models"} == listed
    assert cfg["package-dir"] == {"graphgrow.models": "models"}


def test_zoo_is_graphgrow_models():
    pytest.importorskip("torch")
    from graphgrow import models

    assert os.path.samefile(os.path.dirname(models.__file__), os.path.join(ROOT, "models"))
    assert "resnet_small" in models.ZOO


def _fresh(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_onnx_path_imports_no_torch():
    code = ("import sys, graphgrow, graphgrow.onnx, graphgrow.cli, graphgrow.compare\n"
            "import graphgrow.onnx.engine, graphgrow.onnx.deepening, graphgrow.onnx.api\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(len(bad))")
    r = _fresh(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
