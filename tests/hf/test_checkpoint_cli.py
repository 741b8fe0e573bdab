"""`graphgrow widen|deepen DIR`: a sharded bf16 checkpoint directory grown in the same layout, checked, and
the bad inputs refused with exit code 2 and nothing written."""

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from graphgrow.cli import main  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 4-layer GQA Llama in bf16, in 4 safetensors shards + index, with a tokenizer file."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("ckpt") / "src"
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer.json").write_text('{"fake": true}')
    return path


def logits(path, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


def tokens():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def files(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("factor,hidden", [("2", 128), ("1.5", 96)])
def test_widen_directory(ckpt, tmp_path, factor, hidden):
    out = tmp_path / "wide"
    assert main(["widen", str(ckpt), "--factor", factor, "-o", str(out)]) == 0
    assert files(out) == files(ckpt)  # same shards, index, config, tokenizer and generation files
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == hidden and config["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files(ckpt) if f.endswith(".safetensors")}
    grown = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert grown.dtype == torch.bfloat16 and grown.config.hidden_size == hidden
    a, b = logits(ckpt, tokens()), logits(out, tokens())
    assert float((a - b).abs().max() / a.abs().max()) < 3e-2  # bf16 rounding of the rescaled weights


def test_deepen_directory(ckpt, tmp_path):
    out = tmp_path / "deep"
    assert main(["deepen", str(ckpt), "--after", "model.layers.(1|3)", "--block", "copy", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert torch.equal(logits(ckpt, tokens()), logits(out, tokens()))


def test_output_directory_not_empty_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["widen", str(ckpt), "--factor", "2", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert files(out) == ["keep.txt"]


def _copy(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    return bad


def test_pickled_weights_need_allow_pickle(tmp_path, capsys):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    src = tmp_path / "pickled"
    src.mkdir()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert main(["widen", str(src), "--factor", "2", "-o", str(out)]) == 2
    assert "allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["widen", str(src), "--factor", "2", "-o", str(out), "--allow-pickle"]) == 0
    assert (out / "model.safetensors").exists()


def test_shard_outside_the_directory_is_refused(ckpt, tmp_path, capsys):
    bad = _copy(ckpt, tmp_path)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../evil.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert main(["widen", str(bad), "--factor", "2", "-o", str(out)]) == 2
    assert "evil" in capsys.readouterr().err and not out.exists()


def test_config_disagreeing_with_weights_is_refused(ckpt, tmp_path, capsys):
    bad = _copy(ckpt, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["deepen", str(bad), "--after", "model.layers.0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disagree" in err and err.count("\n") == 1 and not out.exists()


def test_unknown_architecture_is_refused(ckpt, tmp_path, capsys):
    bad = _copy(ckpt, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MyCustomForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["widen", str(bad), "--factor", "2", "-o", str(tmp_path / "out")]) == 2
    assert "custom code is never run" in capsys.readouterr().err


def test_streamed_weights_are_the_in_memory_ones(tmp_path):
    """widen_checkpoint plans on a weightless model and streams recipes; the result is bit for bit the
    in-memory graphgrow.widen of the same model (float32 checkpoint, tied embeddings, fill + rescale)."""
    from safetensors.torch import load_file

    import graphgrow
    from graphgrow.hf.stream import widen_checkpoint

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    in_memory = graphgrow.widen(model, 1.5, example_inputs=(torch.randint(0, VOCAB, (1, 8)),)).state_dict()
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 1.5)
    assert result["check"]["max_rel"] < 1e-5
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    assert set(streamed) <= set(in_memory)
    for key, value in streamed.items():
        assert torch.equal(value, in_memory[key]), key


def _gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))


def _falcon():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
        multi_query=True, parallel_attn=True, bias=False))


@pytest.mark.parametrize("family", [_gemma, _falcon])
def test_streamed_families_match_in_memory(tmp_path, family):
    """Planning on the meta device must see what the in-memory capture sees, or refuse: Gemma's sqrt(hidden)
    normalizer is a non-persistent buffer, left on the meta device its value was unknown and the table went
    uncompensated (2e-2 off; only the final check caught it); Falcon's constant kv-slot indices, computed on the
    meta device, were read as garbage (an IndexError). With --no-check, the output must still be right."""
    from safetensors.torch import load_file

    import graphgrow
    from graphgrow.hf.stream import widen_checkpoint

    torch.manual_seed(0)
    model = family().eval()
    model.save_pretrained(tmp_path / "src")
    x = torch.randint(0, VOCAB, (2, 8))
    result = widen_checkpoint(tmp_path / "src", tmp_path / "out", 2, check=False)
    assert result["check"] is None
    grown = type(model).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        a, b = model(x).logits, grown(x).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    assert sum(p.numel() for p in grown.parameters()) > 1.5 * sum(p.numel() for p in model.parameters())
    if family is _gemma:  # the same weights as the in-memory widening
        in_memory = graphgrow.widen(model, 2, example_inputs=(x,)).state_dict()
        for key, value in load_file(tmp_path / "out" / "model.safetensors").items():
            assert torch.equal(value, in_memory[key]), key


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer float32 Llama in one safetensors file: config.json is what the validator tests break."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("small") / "src"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# one case per kind of check transformers (or the model's constructor) makes: (config change, words of the sentence)
BAD_CONFIGS = {
    "string size": ({"hidden_size": "64"}, ["'hidden_size'", "expected int, got str"]),
    "float for int": ({"intermediate_size": 128.5}, ["'intermediate_size'", "expected int, got float"]),
    "bool for int": ({"hidden_size": True}, ["'hidden_size'", "got bool"]),
    "string for float": ({"rms_norm_eps": "small"}, ["'rms_norm_eps'", "expected float"]),
    "heads not dividing": ({"num_attention_heads": 5}, ["'num_attention_heads'", "not a multiple"]),
    "zero heads": ({"num_attention_heads": 0}, ["'num_attention_heads'", "by zero"]),
    "negative heads": ({"num_attention_heads": -4}, ["'num_attention_heads'", "negative dimension"]),
    "layer_types length": ({"layer_types": ["full_attention"] * 3}, ["'layer_types'", "must be equal"]),
    "layer_types entry": ({"layer_types": ["weird", "weird"]}, ["'layer_types'", "must be in"]),
    "unknown rope type": ({"rope_scaling": {"rope_type": "nope"}}, ["'rope_scaling'", "'nope'"]),
    "unknown activation": ({"hidden_act": "swishy"}, ["'hidden_act'", "'swishy'"]),
    "unknown model_type": ({"model_type": "foobar"}, ["model_type 'foobar'", "custom code is never run"]),
    "missing model_type": ({"model_type": None}, ["no 'model_type'"]),
    "architectures not a list": ({"architectures": "LlamaForCausalLM"}, ["'architectures'", "list"]),
    "missing size": ({"hidden_size": None}, ["disagree", "lm_head.weight"]),  # the default disagrees with the weights
}


def _broken(src, tmp_path, change: dict):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    for key, value in change.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_rejected_by_transformers_is_one_sentence(small, tmp_path, capsys, case):
    change, words = BAD_CONFIGS[case]
    bad = _broken(small, tmp_path, change)
    before = {f: (bad / f).read_bytes() for f in files(bad)}
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["widen", str(bad), "--factor", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphgrow: error: "), err
    assert all(w in err for w in words), err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".graphgrow-")]
    assert {f: (bad / f).read_bytes() for f in files(bad)} == before  # input untouched


def test_config_rejected_python_api_and_subprocess(small, tmp_path):
    """widen_checkpoint raises the GraphGrowError; ``python -m graphgrow`` prints one line and exits 2."""
    import subprocess
    import sys

    from graphgrow.errors import GraphGrowError
    from graphgrow.hf.stream import widen_checkpoint

    bad = _broken(small, tmp_path, {"num_attention_heads": 5})
    with pytest.raises(GraphGrowError, match="'num_attention_heads'"):
        widen_checkpoint(bad, tmp_path / "api", 2)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "graphgrow", "widen", str(bad), "--factor", "2", "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=root, timeout=600,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'num_attention_heads'" in r.stderr, r.stderr
    assert not (tmp_path / "api").exists() and not (tmp_path / "out").exists()
