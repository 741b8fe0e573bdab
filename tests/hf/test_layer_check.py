"""The default check of a grown checkpoint directory: both models run one layer at a time
(graphgrow.hf.layer_check), every vocabulary row of the head compared; a corrupted output tensor is caught
(exit 1, nothing in place); families whose layers cannot be chained fall back to the whole-model check, or
are refused in one sentence when that would not fit in memory."""

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from graphgrow.cli import main  # noqa: E402
from graphgrow.errors import UnsupportedModelError, VerificationError  # noqa: E402
from graphgrow.hf import layer_check, stream  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
import hf_families  # noqa: E402

VOCAB = 700  # more rows than the skeleton keeps: rows outside them are compared by the chunked head


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama") / "src"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="200KB")
    return path


def test_default_check_runs_layer_by_layer(llama, tmp_path):
    result = stream.widen_checkpoint(llama, tmp_path / "wide", 2)
    check = result["check"]
    assert check["check"] == "layers" and check["layers"] == 3 and check["vocab_rows"] == VOCAB
    assert check["max_rel"] < 1e-5
    full = stream.widen_checkpoint(llama, tmp_path / "wide-full", 2, check="full")["check"]
    assert full["check"] == "full" and full["max_rel"] < 1e-5


def test_deepen_is_checked_layer_by_layer(llama, tmp_path):
    check = stream.deepen_checkpoint(llama, tmp_path / "deep", after="model.layers.1")["check"]
    assert check["check"] == "layers" and check["layers"] == 4 and check["max_rel"] < 1e-6


def _corrupting(monkeypatch, target: str, row: int | None = None):
    """Flip one weight of the output tensor ``target`` between its computation and the check."""
    compute = stream._WidenStream.compute

    def corrupted(self, name, tensor):
        out = compute(self, name, tensor)
        if target in out:
            t = out[target].clone()
            (t[row] if row is not None else t.view(-1))[3] += 1.0
            out[target] = t
        return out

    monkeypatch.setattr(stream._WidenStream, "compute", corrupted)


@pytest.mark.parametrize("target,row", [("model.layers.1.mlp.down_proj.weight", None),
                                        ("model.layers.2.self_attn.k_proj.weight", None),
                                        ("model.norm.weight", None)])
def test_corrupted_layer_is_caught(llama, tmp_path, monkeypatch, capsys, target, row):
    _corrupting(monkeypatch, target, row)
    out = tmp_path / "wide"
    assert main(["widen", str(llama), "--factor", "2", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not equivalent" in err and "layer by layer" in err
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing in place, no temporary left


def test_float64_checkpoint_widens_and_a_small_error_is_still_caught(tmp_path, monkeypatch, capsys):
    """A float64 Llama's RMSNorm computes in float32 (transformers' code), so a correct widening moves its outputs
    by float32 rounding (~1e-7): inside the float64 tolerance (1e-6); a weight off by 1e-3 of its scale is not."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).double().save_pretrained(src)
    for factor in (2, 1.5):
        check = stream.widen_checkpoint(src, tmp_path / f"wide{factor}", factor)["check"]
        assert check["checked_dtype"] == "torch.float64" and check["max_rel"] <= 1e-6, check
    compute = stream._WidenStream.compute

    def nudged(self, name, tensor):
        out = compute(self, name, tensor)
        key = "model.layers.1.mlp.down_proj.weight"
        if key in out:
            t = out[key].clone()
            t.view(-1)[3] += 1e-3 * float(t.abs().max())
            out[key] = t
        return out

    monkeypatch.setattr(stream._WidenStream, "compute", nudged)
    assert main(["widen", str(src), "--factor", "2", "-o", str(tmp_path / "bad")]) == 1
    assert "not equivalent" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_corrupted_head_row_outside_the_kept_rows_is_caught(llama, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    kept = set(torch.randperm(VOCAB, generator=gen)[:layer_check.VOCAB_ROWS].tolist())  # (the check's draw, seed 0)
    row = next(r for r in range(VOCAB) if r not in kept)
    _corrupting(monkeypatch, "lm_head.weight", row)
    with pytest.raises(VerificationError, match="layer by layer"):
        stream.widen_checkpoint(llama, tmp_path / "wide", 2)
    assert not (tmp_path / "wide").exists()


@pytest.mark.parametrize("family", ["t5", "mixtral", "bert", "gpt-neox", "gemma2", "bart", "vit", "deepseek-v3"])
def test_layer_check_agrees_with_the_whole_model_check(tmp_path, family):
    model, _ = hf_families.build(family)
    src = tmp_path / "src"
    model.save_pretrained(src)
    check = stream.widen_checkpoint(src, tmp_path / "wide", 2)["check"]
    assert check["check"] == "layers" and check["max_rel"] < 1e-5
    assert check["layers"] == sum(s.n for s in layer_check.chain_stacks(
        __import__("graphgrow.hf.stacks", fromlist=["layer_stacks"]).layer_stacks(model), family))


def test_unchainable_family_falls_back_to_the_whole_model_check(tmp_path, monkeypatch, capsys):
    model, _ = hf_families.build("modernbert")  # (global attention every n-th layer: chosen by the layer's index)
    src = tmp_path / "src"
    model.save_pretrained(src)
    check = stream.widen_checkpoint(src, tmp_path / "wide", 2)["check"]
    assert check["check"] == "full" and check["max_rel"] < 1e-5 and "not applicable" in check["note"]
    monkeypatch.setattr(stream, "_available_memory", lambda: 1000)  # a machine where both would not fit
    with pytest.raises(UnsupportedModelError, match="--check full"):
        stream.widen_checkpoint(src, tmp_path / "wide2", 2)
    assert main(["widen", str(src), "--factor", "2", "-o", str(tmp_path / "wide3")]) == 2
    assert "more than the" in capsys.readouterr().err and not (tmp_path / "wide3").exists()


def test_cli_reports_which_check_ran(llama, tmp_path, capsys):
    assert main(["widen", str(llama), "--factor", "2", "-o", str(tmp_path / "a"), "--report",
                 str(tmp_path / "r.json")]) == 0
    assert "checked (layer by layer, 3 layers, 700 vocabulary rows)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["check"]["check"] == "layers"
    assert main(["widen", str(llama), "--factor", "2", "-o", str(tmp_path / "b"), "--check", "full"]) == 0
    assert "checked (whole models)" in capsys.readouterr().out


def test_streamed_codegen_takes_the_in_memory_fallbacks(tmp_path):
    """CodeGen's fused heads: the streamed widening is checked and, like graphgrow.widen, falls back where the
    check fails; the written model equals the original's function (verified here independently)."""
    model, _ = hf_families.build("codegen")
    src = tmp_path / "src"
    model.save_pretrained(src)
    result = stream.widen_checkpoint(src, tmp_path / "wide", 2)
    assert result["check"]["max_rel"] < 1e-5
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "wide", dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model.eval()(x).logits, grown(x).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    import graphgrow

    in_memory = graphgrow.widen(model, 2, example_inputs=(x,)).config
    assert (grown.config.n_embd, grown.config.n_head, grown.config.n_inner) == \
        (in_memory.n_embd, in_memory.n_head, in_memory.n_inner)
    assert grown.config.n_inner == 2 * model.config.n_inner


def test_output_disk_without_room_is_refused_before_writing(llama, tmp_path, monkeypatch, capsys):
    import collections

    from graphgrow.hf import checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 10 ** 5, 10 ** 5))
    out = tmp_path / "wide"
    assert main(["widen", str(llama), "--factor", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GiB free" in err and "nothing written" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_ernie_sparse_range_is_reindexed_per_skeleton():
    """ERNIE 4.5 MoE: layer i is sparse when start <= i <= end and (i + 1) % interval == 0; a skeleton holding one
    or two of the layers restates the triple so that each keeps its kind."""
    cfg = transformers.Ernie4_5_MoeConfig(num_hidden_layers=6, moe_layer_start_index=1, moe_layer_end_index=4,
                                          moe_layer_interval=2, moe_num_experts=4, hidden_size=16,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=32)

    def kinds(c, n):
        return [(i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= c.moe_layer_end_index
                for i in range(n)]

    stack = type("S", (), dict(path="model.layers", field="num_hidden_layers", n=6, keep=(), index=None))()
    full = kinds(cfg, 6)
    assert full == [False, True, False, True, False, False]
    for chosen in ([0], [1], [3], [5], [0, 1], [1, 3], [3, 4], [4, 5], [1, 2]):
        sk = layer_check.skeleton_config(cfg, [stack], {"model.layers": chosen}, None)
        assert sk.num_hidden_layers == len(chosen)
        assert kinds(sk, len(chosen)) == [full[i] for i in chosen], chosen
