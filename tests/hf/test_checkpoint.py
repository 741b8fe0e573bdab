"""graphgrow.hf.checkpoint: reading Hugging Face checkpoint directories and the streaming, atomic writer."""

import filecmp
import json
import os
import re

import pytest

pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open

from graphgrow.errors import InvalidArgumentError, ModelFileError
from graphgrow.hf.checkpoint import Checkpoint, rewrite_checkpoint

SHARD = "20KB"  # splits the tiny Llama (90 KB in fp32) into several files


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save(model, folder, sharded):
    model.save_pretrained(folder, max_shard_size=SHARD if sharded else "10GB")
    return folder


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


class Identity:
    def __init__(self, src):
        self.src = src

    def outputs(self, name):
        return [(name, self.src.shape(name), self.src.dtype(name))]

    def compute(self, name, tensor):
        return {name: tensor}


class DuplicateLayer(Identity):
    """Layer 1 is written twice, as layers 1 and 2; later layers move up by one."""

    def rename(self, name):
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if not m:
            return [name]
        i, rest = int(m.group(1)), m.group(2)
        return [f"model.layers.{j}.{rest}" for j in ([1, 2] if i == 1 else [i + (i > 1)])]

    def outputs(self, name):
        return [(new, self.src.shape(name), self.src.dtype(name)) for new in self.rename(name)]

    def compute(self, name, tensor):
        return {new: tensor.clone() for new in self.rename(name)}


def read_all(folder):
    """name -> tensor of every safetensors file in ``folder``."""
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.offset_keys()})
    return tensors


def logits(folder, dtype):
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


@pytest.mark.parametrize("sharded", [False, True])
def test_reads_names_shapes_dtypes_and_data(tmp_path, sharded):
    model = tiny_llama()
    ckpt = Checkpoint.open(save(model, tmp_path / "m", sharded))
    state = model.state_dict()
    assert sorted(ckpt.names()) == sorted(state)
    assert ckpt.config["num_hidden_layers"] == 2
    for name, t in state.items():
        assert ckpt.shape(name) == tuple(t.shape) and ckpt.dtype(name) == t.dtype
        assert ckpt.nbytes(name) == t.numel() * t.element_size()
        assert same_bits(ckpt.get(name), t)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert ckpt.largest_tensor_bytes == max(t.numel() * t.element_size() for t in state.values())
    assert [n for _, names in ckpt.shards for n in names] == ckpt.names()
    if sharded:
        weight_map = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(ckpt.shards) > 1 and all(ckpt.shard_of(n) == f for n, f in weight_map.items())
    else:
        assert [f for f, _ in ckpt.shards] == ["model.safetensors"]
    assert ckpt.other_files() == ["generation_config.json"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sharded", [False, True])
def test_identity_rewrite_is_bit_exact(tmp_path, dtype, sharded):
    src = save(tiny_llama(dtype), tmp_path / "src", sharded)
    ckpt = Checkpoint.open(src)
    seen = []
    out = rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt),
                             progress=lambda done, total, name: seen.append((done, total, name)))
    assert out == str(tmp_path / "out")
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    before, after = read_all(src), read_all(out)
    assert before.keys() == after.keys() and all(same_bits(before[k], after[k]) for k in before)
    if sharded:
        old, new = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (src, tmp_path / "out"))
        assert new["weight_map"] == old["weight_map"]
        assert new["metadata"]["total_size"] == old["metadata"]["total_size"]
    elif dtype is torch.float32:  # one dtype: laid out exactly as safetensors lays it out
        assert filecmp.cmp(src / "model.safetensors", tmp_path / "out" / "model.safetensors", shallow=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == ckpt.config
    assert [name for *_, name in seen] == ckpt.names() and seen[-1][:2] == (ckpt.total_bytes,) * 2
    assert torch.equal(logits(src, dtype), logits(out, dtype))


def test_duplicated_layer_writes_a_correct_index(tmp_path):
    model = tiny_llama()
    ckpt = Checkpoint.open(save(model, tmp_path / "src", sharded=True))
    config = dict(ckpt.config, num_hidden_layers=3)
    out = rewrite_checkpoint(ckpt, tmp_path / "out", config, DuplicateLayer(ckpt))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    tensors = read_all(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():  # each tensor is in the file the index names
        with safe_open(os.path.join(out, file), framework="pt") as f:
            assert name in f.offset_keys()
    grown, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for a, b in zip(grown.model.layers[2].parameters(), model.model.layers[1].parameters()):
        assert torch.equal(a, b)


def test_other_files_are_copied_but_old_weights_are_not(tmp_path):
    src = save(tiny_llama(), tmp_path / "src", sharded=False)
    (src / "tokenizer.json").write_bytes(b'{"version": "1.0", "\xc3\xa9": 1}')
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept\n")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref\n")
    torch.save({"x": torch.zeros(2)}, src / "pytorch_model.bin")  # the old weights in another format
    ckpt = Checkpoint.open(src)
    assert ckpt.other_files() == ["generation_config.json", "tokenizer.json", os.path.join("extra", "notes.txt")]
    out = rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt))
    for rel in ckpt.other_files():
        assert filecmp.cmp(src / rel, os.path.join(out, rel), shallow=False)
    assert sorted(os.listdir(out)) == ["config.json", "extra", "generation_config.json", "model.safetensors",
                                       "tokenizer.json"]


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path):
    """A snapshot of the Hugging Face cache links its files to ../../blobs: that is allowed."""
    plain = save(tiny_llama(), tmp_path / "plain", sharded=False)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    for file in os.listdir(plain):
        os.replace(plain / file, repo / "blobs" / file)
        os.symlink(os.path.join("..", "..", "blobs", file), repo / "snapshots" / "rev" / file)
    ckpt = Checkpoint.open(repo / "snapshots" / "rev")
    out = rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt))
    assert not os.path.islink(os.path.join(out, "generation_config.json"))
    assert filecmp.cmp(repo / "blobs" / "model.safetensors", os.path.join(out, "model.safetensors"), shallow=False)


def test_pickled_weights_need_allow_pickle(tmp_path):
    model = tiny_llama()
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    state = model.state_dict()
    names = list(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, part in shards.items():
        torch.save({n: state[n] for n in part}, src / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(InvalidArgumentError, match="allow-pickle"):
        Checkpoint.open(src)
    ckpt = Checkpoint.open(src, allow_pickle=True)
    assert all(same_bits(ckpt.get(n), t) for n, t in state.items())
    out = rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt))
    assert sorted(os.listdir(out)) == ["config.json", "model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    after = read_all(out)
    assert after.keys() == state.keys() and all(same_bits(after[n], t) for n, t in state.items())


def set_shard_name(folder, old, new):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: new if v == old else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.fixture
def sharded_dir(tmp_path):
    return save(tiny_llama(), tmp_path / "src", sharded=True)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/evil.safetensors", "sub/../../evil.safetensors"])
def test_refuses_shard_names_outside_the_directory(tmp_path, sharded_dir, bad):
    os.replace(sharded_dir / "model-00001-of-00006.safetensors", tmp_path / "evil.safetensors")
    set_shard_name(sharded_dir, "model-00001-of-00006.safetensors", bad)
    with pytest.raises(ModelFileError, match="outside the checkpoint directory"):
        Checkpoint.open(sharded_dir)


def test_refuses_symlinks_outside_the_directory(tmp_path, sharded_dir):
    os.replace(sharded_dir / "model-00001-of-00006.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", sharded_dir / "model-00001-of-00006.safetensors")
    with pytest.raises(ModelFileError, match="outside the checkpoint directory"):
        Checkpoint.open(sharded_dir)
    os.remove(sharded_dir / "model-00001-of-00006.safetensors")
    os.replace(tmp_path / "elsewhere.safetensors", sharded_dir / "model-00001-of-00006.safetensors")
    os.symlink("/etc/hostname", sharded_dir / "hostname")  # an "other file" would be copied into the output
    with pytest.raises(ModelFileError, match="outside the checkpoint directory"):
        Checkpoint.open(sharded_dir).other_files()


def test_refuses_damaged_checkpoints(tmp_path, sharded_dir):
    shard = sharded_dir / "model-00002-of-00006.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"#" * 20 + data[28:])  # the JSON header is no longer JSON
    with pytest.raises(ModelFileError, match="model-00002-of-00006.safetensors has no readable safetensors header"):
        Checkpoint.open(sharded_dir)
    shard.write_bytes(data[:-4])  # truncated
    with pytest.raises(ModelFileError, match="no readable safetensors header"):
        Checkpoint.open(sharded_dir)
    shard.unlink()
    with pytest.raises(ModelFileError, match="model-00002-of-00006.safetensors is missing"):
        Checkpoint.open(sharded_dir)
    shard.write_bytes(data)
    set_shard_name(sharded_dir, "model-00002-of-00006.safetensors", "model-00003-of-00006.safetensors")
    with pytest.raises(ModelFileError, match="which does not hold it"):
        Checkpoint.open(sharded_dir)


def test_refuses_missing_or_bad_config_and_weights(tmp_path):
    src = save(tiny_llama(), tmp_path / "src", sharded=False)
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        Checkpoint.open(src / "model.safetensors")
    config = (src / "config.json").read_text()
    for text, message in [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")]:
        (src / "config.json").write_text(text)
        with pytest.raises(ModelFileError, match=message):
            Checkpoint.open(src)
    (src / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json: no such file"):
        Checkpoint.open(src)
    (src / "config.json").write_text(config)
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="holds no weights"):
        Checkpoint.open(src)


def test_output_directory_refusals_and_overwrite(tmp_path):
    src = save(tiny_llama(), tmp_path / "src", sharded=False)
    ckpt = Checkpoint.open(src)
    for out in (src, tmp_path, src / "inside"):
        with pytest.raises(InvalidArgumentError, match="checkpoint being read"):
            rewrite_checkpoint(ckpt, out, ckpt.config, Identity(ckpt), overwrite=True)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        rewrite_checkpoint(ckpt, tmp_path / "no" / "out", ckpt.config, Identity(ckpt))
    (tmp_path / "empty").mkdir()
    rewrite_checkpoint(ckpt, tmp_path / "empty", ckpt.config, Identity(ckpt))  # an empty folder is fine
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old\n")
    with pytest.raises(InvalidArgumentError, match="not empty; pass --overwrite"):
        rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt))
    rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Identity(ckpt), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "out", "src"]


class FailHalfway(Identity):
    def __init__(self, src, fail):
        super().__init__(src)
        self.fail, self.calls = fail, 0

    def compute(self, name, tensor):
        self.calls += 1
        if self.calls == len(self.src.names()) // 2:
            return self.fail(name, tensor)
        return {name: tensor}


def _raise(name, tensor):
    raise KeyboardInterrupt


@pytest.mark.parametrize("fail, error, message", [
    (_raise, KeyboardInterrupt, None),
    (lambda name, t: {name: t[:1]}, RuntimeError, r"plan.compute made tensor '.*' \(from '.*'\) as \(1,"),
    (lambda name, t: {name: t.half()}, RuntimeError, "torch.float16, but plan.outputs announced"),
    (lambda name, t: {"other": t}, RuntimeError, r"plan.compute made \['other'\] from tensor"),
])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_halfway_leaves_nothing_behind(tmp_path, sharded_dir, fail, error, message, existing):
    ckpt = Checkpoint.open(sharded_dir)
    if existing:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.txt").write_text("old\n")
    with pytest.raises(error, match=message):
        rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, FailHalfway(ckpt, fail), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == (["out", "src"] if existing else ["src"])
    if existing:
        assert os.listdir(tmp_path / "out") == ["old.txt"]


def test_plan_announcing_one_tensor_twice_is_an_error(tmp_path, sharded_dir):
    ckpt = Checkpoint.open(sharded_dir)

    class Clash(Identity):
        def outputs(self, name):
            return [("same", (1,), torch.float32)]

    with pytest.raises(RuntimeError, match="the plan makes tensor 'same' from both"):
        rewrite_checkpoint(ckpt, tmp_path / "out", ckpt.config, Clash(ckpt))
    assert sorted(os.listdir(tmp_path)) == ["src"]
