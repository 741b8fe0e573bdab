"""G_stack (graphgrow.deepen(..., block="stack", times=g)) on transformers decoders: the layer stack repeated g
times, every repeat bit-identical to its source layer, the config stating g*L layers (per-layer lists repeated),
labelled NOT function-preserving with the measured deviation of the logits (> 0, the same figure as computed
here), save/load and generate; partial stacks and bad factors refused in one sentence."""

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphgrow  # noqa: E402
from graphgrow.errors import InvalidArgumentError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
import hf_families  # noqa: E402
from hf_testing import logits_rel, n_params, token_ids  # noqa: E402

VOCAB = 96


def llama(layers=2):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def layer_state(model, path, i):
    return {k: v for k, v in model.get_submodule(f"{path}.{i}").state_dict().items()}


def assert_stacked(model, grown, path, times, x):
    n = model.config.num_hidden_layers
    assert grown.config.num_hidden_layers == times * n and len(grown.get_submodule(path)) == times * n
    for i in range(n):
        src = layer_state(model, path, i)
        for r in range(times):
            copy = layer_state(grown, path, i + r * n)
            assert copy.keys() == src.keys() and all(torch.equal(copy[k], src[k]) for k in src)
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith(path + ".")}
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in outside.items())
    layer = sum(p.numel() for p in model.get_submodule(f"{path}.0").parameters())
    assert n_params(grown) == n_params(model) + (times - 1) * n * layer
    report = grown.graphgrow_report
    assert report.function_preserving is False and (report.params_before, report.params_after) == (
        n_params(model), n_params(grown))
    rel = logits_rel(model, grown, x)
    assert report.deviation > 1e-3 and report.deviation == pytest.approx(rel, rel=1e-5)
    assert "NOT function-preserving" in report.summary()


@pytest.mark.parametrize("times", [2, 3])
def test_llama_stack(times, tmp_path):
    model, x = llama(), token_ids(VOCAB)
    grown = graphgrow.deepen(model, after=None, block="stack", times=times, example_inputs=(x,))
    assert type(grown) is type(model)
    assert_stacked(model, grown, "model.layers", times, x)
    assert n_params(model) == 86_336 and n_params(grown) == {2: 160_320, 3: 234_304}[times]
    prompt = x[:1, :6]  # KV cache slots numbered by the rebuilt layers
    out = grown.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
    grown.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert logits_rel(grown, again, x) == 0.0


def test_gpt2_stack_with_after_naming_the_whole_stack():
    model, _ = hf_families.build("gpt2")
    x = token_ids(model.config.vocab_size)
    grown = graphgrow.deepen(model, after=r"transformer\.h\.\d+", block="stack", example_inputs=(x,))
    assert_stacked(model, grown, "transformer.h", 2, x)


def test_per_layer_types_repeat_with_the_stack():
    model, _ = hf_families.build("gemma2", layers=4)  # sliding / full attention alternate by layer
    x = token_ids(model.config.vocab_size)
    grown = graphgrow.deepen(model, after=None, block="stack", example_inputs=(x,))
    assert grown.config.layer_types == list(model.config.layer_types) * 2
    assert_stacked(model, grown, "model.layers", 2, x)


def test_stack_refusals():
    model, x = llama(), token_ids(VOCAB)
    with pytest.raises(InvalidArgumentError, match="matches 1 of the 2 layers"):
        graphgrow.deepen(model, after=r"model\.layers\.0", block="stack", example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="integer >= 2"):
        graphgrow.deepen(model, after=None, block="stack", times=1, example_inputs=(x,))
    with pytest.raises(InvalidArgumentError, match="block='stack'"):
        graphgrow.deepen(model, after=None, block="nope", example_inputs=(x,))


def test_cli_stacks_a_checkpoint_directory(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from graphgrow.cli import main

    model, x = llama(), token_ids(VOCAB)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src, max_shard_size="100KB")
    assert main(["deepen", str(src), "--block", "stack", "--times", "3", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NOT function-preserving" in printed and "86,336 -> 234,304" in printed
    assert main(["deepen", str(src), "--block", "stack", "-o", str(tmp_path / "two"), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["deviation"] > 1e-3
    grown = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    in_memory = graphgrow.deepen(model, after=None, block="stack", times=3, example_inputs=(x,))
    assert grown.config.num_hidden_layers == 6
    assert all(torch.equal(v, in_memory.state_dict()[k]) for k, v in grown.state_dict().items())
    assert logits_rel(model, grown, x) > 1e-3
    assert main(["deepen", str(src), "--block", "copy", "--times", "2", "-o", str(tmp_path / "x")]) == 2
    assert main(["deepen", str(src), "-o", str(tmp_path / "y")]) == 2  # --after is required for block copy
    assert "--after is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_optimizer_state_follows_the_stack():
    """grow_optimizer replays the recorded G_stack (times included): under "copy" every repeat's Adam moments
    are its source layer's, the step count kept."""
    model, x = llama(), token_ids(VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    grown = graphgrow.deepen(model, after=None, block="stack", times=3, example_inputs=(x,))
    new = graphgrow.grow_optimizer(opt, model, grown, mode="copy")
    old_state = {n: opt.state[p] for n, p in model.named_parameters()}
    params = dict(grown.named_parameters())
    for name, p in params.items():
        src = name
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            src = f"model.layers.{int(i) % 2}.{rest}"
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[p][k], old_state[src][k]), (name, k)
        assert float(new.state[p]["step"]) == 2
