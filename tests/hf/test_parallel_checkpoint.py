"""graphgrow.hf.parallel: checkpoint directories written by a pool of processes, by a caller's executor and by a
Ray cluster; every written file (shards, index, config) has the serial writer's bytes (sha256), failures in a
worker leave nothing behind, bad settings are one sentence."""

import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from graphgrow.cli import main  # noqa: E402
from graphgrow.errors import GraphGrowError, InvalidArgumentError  # noqa: E402
from graphgrow.hf import parallel  # noqa: E402
from graphgrow.hf.checkpoint import Checkpoint, rewrite_checkpoint  # noqa: E402
from graphgrow.hf.stream import deepen_checkpoint, widen_checkpoint  # noqa: E402

VOCAB = 96


@pytest.fixture(autouse=True)
def _small_tasks(monkeypatch):
    """Tasks of any size (the tiny checkpoints would otherwise be one task)."""
    monkeypatch.setattr(parallel, "MIN_TASK_BYTES", 1)


@pytest.fixture(scope="module")
def pool():
    """One spawned pool for the tests that pass an executor (workers start by importing torch: seconds)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        yield ex


def llama(folder, shard, dtype=torch.bfloat16, layers=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer.json").write_text('{"fake": true}')
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return llama(tmp_path_factory.mktemp("sharded") / "src", "100KB")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return llama(tmp_path_factory.mktemp("single") / "src", "10GB", torch.float32)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Mixtral stores every expert's w1 / w2 / w3 apart, across shards: transformers stacks them on load."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=128,
                                     num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("mixtral") / "src"
    transformers.MixtralForCausalLM(cfg).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


def digests(folder):
    """Relative path -> sha256 of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_widen_on_a_pool_is_bit_identical_progress_and_check(sharded, tmp_path):
    serial = widen_checkpoint(sharded, tmp_path / "serial", 1.5, check=False, workers=1)
    ticks = []
    result = widen_checkpoint(sharded, tmp_path / "pool", 1.5, workers=2, progress=lambda *a: ticks.append(a))
    assert digests(tmp_path / "pool") == digests(tmp_path / "serial")
    assert len(digests(tmp_path / "serial")) >= 6  # several shards, index, config, tokenizer, generation config
    assert result["check"]["max_rel"] < 3e-2 and serial["config"].hidden_size == result["config"].hidden_size == 96
    total = Checkpoint.open(sharded).total_bytes
    done = [t[0] for t in ticks]
    assert len(ticks) > 2 and done == sorted(done) and done[-1] == total and {t[1] for t in ticks} == {total}
    assert sorted(os.listdir(tmp_path)) == ["pool", "serial"]  # no temporary folder left


@pytest.mark.parametrize("fixture", ["single", "sharded"])
def test_widen_and_deepen_on_an_executor_are_bit_identical(request, fixture, pool, tmp_path):
    src = request.getfixturevalue(fixture)
    widen_checkpoint(src, tmp_path / "w1", 2, check=False, workers=1)
    widen_checkpoint(src, tmp_path / "w2", 2, check=False, executor=pool)
    assert digests(tmp_path / "w1") == digests(tmp_path / "w2")
    deepen_checkpoint(src, tmp_path / "d1", after="model.layers.(1|3)", check=False, workers=1)
    deepen_checkpoint(src, tmp_path / "d2", after="model.layers.(1|3)", check=False, executor=pool)
    assert digests(tmp_path / "d1") == digests(tmp_path / "d2")
    assert digests(tmp_path / "d1") != digests(tmp_path / "w1")


def test_stacked_experts_are_one_task_and_bit_identical(mixtral, pool, tmp_path):
    """Each stacked parameter's pieces (one per expert, in several shards) are assembled, grown and cut by one
    task: its pieces never land in two tasks, and the written files are the serial writer's."""
    from graphgrow.hf.stream import _WidenStream, meta_model

    src = Checkpoint.open(mixtral)
    model = meta_model(src)
    plan = _WidenStream(src, {}, model.graphgrow_layout, model)
    units = parallel.units(src, plan)
    experts = [u for u in units if len(u) > 1]
    assert len(experts) == 2 * 2  # gate_up (w1 + w3 of 4 experts) and down (w2) of each of 2 layers
    assert {len(u) for u in experts} == {8, 4}
    assert len({src.shard_of(n) for u in experts for n in u}) > 1
    job = parallel.WriteJob(src, plan, str(tmp_path), {n: {} for n in src.names()}, {})
    for task in parallel.tasks(job, units, 2):
        assert all(set(u) <= set(task) or not set(u) & set(task) for u in experts)
    widen_checkpoint(mixtral, tmp_path / "serial", 2, check=False, workers=1)
    result = widen_checkpoint(mixtral, tmp_path / "parallel", 2, executor=pool)
    assert result["check"]["max_rel"] < 1e-5 and result["config"].intermediate_size == 256
    assert digests(tmp_path / "parallel") == digests(tmp_path / "serial")


class Broken:
    """Identity, but one tensor fails (``how``: "raise" a RuntimeError, or "exit" the worker process)."""

    def __init__(self, src, how):
        self.src, self.how, self.bad = src, how, src.names()[len(src.names()) // 2]

    def outputs(self, name):
        return [(name, self.src.shape(name), self.src.dtype(name))]

    def compute(self, name, tensor):
        if name == self.bad and self.how == "raise":
            raise RuntimeError(f"cannot compute {name}")
        if name == self.bad and self.how == "exit":
            os._exit(3)
        return {name: tensor}


@pytest.mark.parametrize("how, error, message", [
    ("raise", RuntimeError, "cannot compute model"),
    ("exit", GraphGrowError, "a worker process of the checkpoint writer died"),
])
def test_worker_failure_leaves_nothing_behind(sharded, tmp_path, how, error, message):
    src = Checkpoint.open(sharded)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old\n")
    with pytest.raises(error, match=message) as info:
        rewrite_checkpoint(src, tmp_path / "out", src.config, Broken(src, how), overwrite=True, workers=2)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["old.txt"]


def test_unpicklable_plan_is_one_sentence(sharded, tmp_path):
    src = Checkpoint.open(sharded)
    plan = Broken(src, "never")
    plan.hook = lambda: None  # (a lambda does not pickle)
    with pytest.raises(GraphGrowError, match="cannot be sent to worker processes.*--workers 1"):
        rewrite_checkpoint(src, tmp_path / "out", src.config, plan, workers=2)
    assert os.listdir(tmp_path) == []


def test_plan_a_worker_cannot_import_is_one_sentence(sharded, pool, tmp_path, monkeypatch):
    import types

    module = types.ModuleType("graphgrow_only_here")  # importable here, not in the workers
    monkeypatch.setitem(sys.modules, module.__name__, module)
    local = type("Local", (Broken,), {"__module__": module.__name__})
    module.Local = local
    src = Checkpoint.open(sharded)
    with pytest.raises(GraphGrowError, match="a worker process cannot read the growth plan .*graphgrow_only_here"):
        rewrite_checkpoint(src, tmp_path / "out", src.config, local(src, "never"), executor=pool)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_bad_workers_are_refused(sharded, tmp_path, workers):
    src = Checkpoint.open(sharded)
    with pytest.raises(InvalidArgumentError, match="workers must be a whole number of at least 1"):
        rewrite_checkpoint(src, tmp_path / "out", src.config, Broken(src, "never"), workers=workers)
    with pytest.raises(InvalidArgumentError, match="executor must be"):
        rewrite_checkpoint(src, tmp_path / "out", src.config, Broken(src, "never"), executor="threads")
    assert os.listdir(tmp_path) == []


def test_default_workers_capped_by_cpus_memory_and_size(sharded, monkeypatch):
    src = Checkpoint.open(sharded)
    plan = Broken(src, "never")
    announced = {n: {n: (tuple(src.shape(n)), src.dtype(n))} for n in src.names()}
    units = parallel.units(src, plan)
    monkeypatch.setattr(parallel, "cpu_count", lambda: 16)
    assert parallel.default_workers(src, announced, units) == 1  # 0.5 MB: written before a pool has started
    monkeypatch.setattr(parallel, "BYTES_PER_WORKER", 1)
    monkeypatch.setattr(parallel, "_available_memory", lambda: 1 << 50)
    assert parallel.default_workers(src, announced, units) == 16
    largest = max(4 * src.nbytes(n) // src.dtype(n).itemsize for n in src.names())  # its float32 bytes
    monkeypatch.setattr(parallel, "_available_memory", lambda: 3 * (4 * largest + parallel.WORKER_OVERHEAD))
    assert parallel.default_workers(src, announced, units) == 3


def test_disk_without_room_is_refused_before_writing(sharded, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    src = Checkpoint.open(sharded)
    with pytest.raises(InvalidArgumentError, match=r"has 0.00 GiB free, and the grown checkpoint needs"):
        rewrite_checkpoint(src, tmp_path / "out", src.config, Broken(src, "never"))
    assert os.listdir(tmp_path) == []


def test_recipes_and_plans_pickle(sharded):
    """The plan of a widening (recipes, the checkpoint) travels to the workers and computes the same bytes."""
    import pickle

    from graphgrow.core.growth import check_factor  # noqa: F401 - (the import widen_checkpoint does)
    from graphgrow.core.sites import GrowOptions
    from graphgrow.hf.stream import _WidenStream, meta_inputs, meta_model
    from graphgrow.hf.widen import plan_widening

    src = Checkpoint.open(sharded)
    model = meta_model(src)
    w = plan_widening(model, meta_inputs(model), 1.5, options=GrowOptions(seed=0))
    plan = _WidenStream(src, w.values, model.graphgrow_layout, model)
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.layout.model is None  # (no pieces: the meta model stays here)
    for name in src.names():
        a, b = plan.compute(name, src.get(name)), copy.compute(name, copy.src.get(name))
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


# --- the command line

def test_cli_workers_bit_identical_and_bad_values(sharded, tmp_path, capsys):
    assert main(["widen", str(sharded), "--factor", "2", "--no-check", "--workers", "1", "-o", str(tmp_path / "a")]) == 0
    assert main(["widen", str(sharded), "--factor", "2", "--no-check", "--workers", "2", "-o", str(tmp_path / "b")]) == 0
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    capsys.readouterr()
    for command in (["widen", str(sharded), "--factor", "2"], ["deepen", str(sharded), "--after", "model.layers.0"]):
        assert main(command + ["--workers", "0", "-o", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert "--workers must be at least 1, not 0" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flag", [["--workers", "2"], ["--ray", "auto"]])
@pytest.mark.parametrize("command", [["widen", "--factor", "2"], ["deepen", "--after", "x"]])
def test_cli_directory_options_on_a_file_are_refused(tmp_path, capsys, flag, command):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    assert main([command[0], str(model)] + command[1:] + flag) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to checkpoint directories" in err and err.count("\n") == 1


def test_ray_not_installed_is_one_sentence(sharded, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # (import ray raises ImportError)
    with pytest.raises(InvalidArgumentError, match=r"needs ray \(pip install 'graphgrow\[ray\]'\)"):
        widen_checkpoint(sharded, tmp_path / "out", 2, check=False, executor="ray")
    assert main(["widen", str(sharded), "--factor", "2", "--ray", "auto", "-o", str(tmp_path / "out")]) == 2
    assert "graphgrow[ray]" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_ray_address_that_does_not_answer_is_refused(sharded, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["widen", str(sharded), "--factor", "2", "--ray", f"127.0.0.1:{port}", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


# --- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    # Ray's workers import this module's plans by name: its folder on their path
    from tests.hf.hf_testing import start_ray

    ray = start_ray(os.path.dirname(__file__))
    yield ray
    ray.shutdown()


def test_ray_cluster_is_bit_identical(ray_cluster, mixtral, sharded, tmp_path, capsys):
    widen_checkpoint(mixtral, tmp_path / "serial", 2, check=False, workers=1)
    result = widen_checkpoint(mixtral, tmp_path / "ray", 2, executor="ray")
    assert result["check"]["max_rel"] < 1e-5
    assert digests(tmp_path / "ray") == digests(tmp_path / "serial")
    assert ray_cluster.is_initialized()  # the session the caller opened stays open
    # the command line, on the session already open in this process
    assert main(["deepen", str(sharded), "--after", "model.layers.1", "--no-check", "--workers", "1",
                 "-o", str(tmp_path / "d1")]) == 0
    assert main(["deepen", str(sharded), "--after", "model.layers.1", "--no-check", "--ray", "auto",
                 "-o", str(tmp_path / "d2")]) == 0
    assert digests(tmp_path / "d1") == digests(tmp_path / "d2")
    # a worker's error is the error, once
    src = Checkpoint.open(sharded)
    with pytest.raises(RuntimeError, match="cannot compute model") as info:
        rewrite_checkpoint(src, tmp_path / "out", src.config, Broken(src, "raise"), executor="ray")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
