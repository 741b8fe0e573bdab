"""benchmarks/paper.py: refusals of bad settings and a tiny end-to-end run (the ``paper`` extra)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mlxtend", reason="needs the paper extra: pip install -e '.[paper]'")
pytest.importorskip("matplotlib", reason="needs the paper extra: pip install -e '.[paper]'")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "paper.py")


def _load():
    spec = importlib.util.spec_from_file_location("paper_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--arms", "wider,bogus"], "unknown arm 'bogus'"),
    (["--steps", "0"], "--steps must be positive, not 0"),
    (["--teacher-steps", "-3"], "--teacher-steps must be positive, not -3"),
    (["--seeds", "0"], "--seeds must be positive, not 0"),
    (["--teacher-lr", "0"], "--teacher-lr must be positive, not 0.0"),
])
def test_bad_settings_refused(args, message, tmp_path):
    r = _run(*args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_absent_device_refused(tmp_path):
    r = _run("--quick", "--device", "cuda", "--out", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "device 'cuda' is not present" in lines[0], r.stderr


def test_teacher_lr_defaults_to_lr_and_can_differ():
    paper = _load()
    cfg = paper.parse_args(["--quick", "--lr", "3e-4"])
    assert cfg.lr == 3e-4 and cfg.teacher_lr is None
    cfg = paper.parse_args(["--quick", "--lr", "1e-4", "--teacher-lr", "1e-3", "--out", "/tmp/x"])
    assert (cfg.lr, cfg.teacher_lr, cfg.out) == (1e-4, 1e-3, "/tmp/x")


def test_split_is_fixed_and_balanced():
    paper = _load()
    cfg = paper.Config(preset="t", image_size=8, train_size=40, val_size=20)
    xt, yt, xv, yv = paper.load_digits_split(cfg)
    assert xt.shape == (40, 1, 8, 8) and xv.shape == (20, 1, 8, 8)
    assert list(yt[:10]) == list(range(10)) and sorted(yv.tolist()) == sorted(list(range(10)) * 2)
    again = paper.load_digits_split(cfg)
    assert (again[0] == xt).all() and (again[3] == yv).all()


def _smoke(tmp_path, arms):
    paper = _load()
    threads = torch.get_num_threads()
    try:
        rc = paper.main(["--smoke", "--arms", arms, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "paper.json").read_text())
    for group, teacher in res["teachers"].items():
        for run in (r for r in res["runs"] if r["arm"].startswith(group)):
            assert abs(run["curve"]["val_acc"][0] - teacher["final_val_acc"]) <= 0.1, (run["arm"], teacher)
            assert run["curve"]["step"] == [0, 2]
    md = (tmp_path / "paper.md").read_text()
    assert "## Conclusion" in md and "function preservation holds" in md
    return res


def test_smoke_run_student_starts_at_teacher_accuracy(tmp_path):
    """A tiny run: the Net2WiderNet student's step-0 accuracy equals the teacher's; shapes = the standard net's."""
    res = _smoke(tmp_path, "wider-net2net")
    wide = next(r for r in res["runs"] if r["arm"] == "wider-net2net")
    assert wide["shapes_equal_standard"]
    assert (tmp_path / "wider.png").stat().st_size > 0
    assert "Net2WiderNet (no noise)" in (tmp_path / "paper.md").read_text()


@pytest.mark.slow
def test_smoke_run_deeper_student_starts_at_teacher_accuracy(tmp_path):
    """The same for Net2DeeperNet (identity 1x3+3x1 pairs) and its random-init baseline (python -m pytest -m slow)."""
    paper = _load()
    if not paper.have_deepen():
        pytest.skip("graphgrow.deepen is not available")
    res = _smoke(tmp_path, "deeper")
    assert {r["arm"] for r in res["runs"]} == {"deeper-net2net", "deeper-random-init"}
    assert (tmp_path / "deeper.png").stat().st_size > 0
