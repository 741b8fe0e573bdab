"""Block expansion on ONNX graphs (block="copy", torch-free): module scopes copied after themselves with the
initializers ending their residual branches zeroed; exact, or refused with the reason."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphgrow import onnx as gonnx
from graphgrow.cli import main
from graphgrow.errors import InvalidArgumentError, UnsupportedModelError

D, F = 8, 16


def residual_mlp(blocks: int = 2, post_norm: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[2,5,D] -> blocks of x + fc2(relu(fc1(LN(x)))) (or LN(x + fc2(relu(fc1(x)))) post-norm) -> head -> y,
    nodes named as the TorchScript exporter names them (/blocks.i/fc1/MatMul)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"

    def w(name, *shape):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name))
        return name

    for i in range(blocks):
        s = f"/blocks.{i}"
        ln_in = x
        if not post_norm:
            nodes.append(helper.make_node("LayerNormalization", [x, w(f"g{i}", D), w(f"b{i}", D)], [f"n{i}"],
                                          name=f"{s}/ln/LayerNormalization", axis=-1))
            ln_in = f"n{i}"
        nodes += [helper.make_node("MatMul", [ln_in, w(f"w1_{i}", D, F)], [f"h{i}"], name=f"{s}/fc1/MatMul"),
                  helper.make_node("Add", [f"h{i}", w(f"c1_{i}", F)], [f"hb{i}"], name=f"{s}/fc1/Add"),
                  helper.make_node("Relu", [f"hb{i}"], [f"r{i}"], name=f"{s}/act/Relu"),
                  helper.make_node("MatMul", [f"r{i}", w(f"w2_{i}", F, D)], [f"o{i}"], name=f"{s}/fc2/MatMul"),
                  helper.make_node("Add", [f"o{i}", w(f"c2_{i}", D)], [f"ob{i}"], name=f"{s}/fc2/Add"),
                  helper.make_node("Add", [x, f"ob{i}"], [f"s{i}"], name=f"{s}/Add")]
        x = f"s{i}"
        if post_norm:
            nodes.append(helper.make_node("LayerNormalization", [x, w(f"g{i}", D), w(f"b{i}", D)], [f"p{i}"],
                                          name=f"{s}/ln/LayerNormalization", axis=-1))
            x = f"p{i}"
    nodes.append(helper.make_node("MatMul", [x, w("head", D, 3)], ["y"], name="/head/MatMul"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_copies_are_exact_and_zeroed():
    res = gonnx.deepen(residual_mlp(), after="blocks.(0|1)", block="copy")
    assert res.check.passed and res.check.outputs[0].max_rel == 0.0
    assert len(res.insertions) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for i in (0, 1):
        assert not inits[f"w2_{i}_copy"].any() and not inits[f"c2_{i}_copy"].any()
        assert np.array_equal(inits[f"w1_{i}_copy"], inits[f"w1_{i}"])
    assert res.params_after == res.params_before + sum(
        numpy_helper.to_array(t).size for t in residual_mlp().graph.initializer if t.name[-1] in "01"
        and t.name != "head")


def test_post_norm_blocks_are_refused():
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        gonnx.deepen(residual_mlp(post_norm=True), after="blocks.0", block="copy")


def test_unknown_scope_is_refused():
    with pytest.raises(InvalidArgumentError, match="matches no module scope"):
        gonnx.deepen(residual_mlp(), after="layers.0", block="copy")


def test_cli_block_copy(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "deep.onnx"
    onnx.save(residual_mlp(), src)
    assert main(["deepen", str(src), "--after", "blocks.1", "--block", "copy", "-o", str(out)]) == 0
    assert sum(n.name.endswith("_copy") for n in onnx.load(out).graph.node) == 7  # LN, 2 x (MatMul, Add), Relu, Add
    onnx.save(residual_mlp(post_norm=True), src)
    assert main(["deepen", str(src), "--after", "blocks.1", "--block", "copy", "-o", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_transformer_export_block_copy():
    torch = pytest.importorskip("torch")
    from graphgrow.models.transformer import tiny_lm

    model = tiny_lm().eval()
    proto = torch.onnx.export(model, (torch.randint(0, 50, (1, 8)),), dynamo=True).model_proto
    res = gonnx.deepen(proto, after="layers.1", block="copy")
    assert res.check.passed and res.check.outputs[0].max_rel == 0.0


def test_bad_regex_is_one_sentence():
    with pytest.raises(InvalidArgumentError, match="not a valid regular expression"):
        gonnx.deepen(residual_mlp(), after="blocks.(", block="copy")
