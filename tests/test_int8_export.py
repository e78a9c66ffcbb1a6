"""The gqa int8 export's LM head and layer schemes (toolkit.export.lm_head_quant, toolkit.export.w8a8): layouts, smoothing, the built graph."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.artifact.manifest import load_manifest
from toolkit.export import lm_head_quant as lq
from toolkit.recipes.registry import get_recipe

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

HIDDEN, VOCAB = 64, 96


def _run(model, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def _head_graph(weight: np.ndarray, gamma: np.ndarray, extra_use: bool = False):
    """hidden [1, T, H] -> SimplifiedLayerNormalization(gamma) -> last position -> 8-bit MatMulNBits head -> logits."""
    q, scales = lq.quantize_blockwise(weight, 8, 32)
    vocab, hidden = weight.shape
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["hidden", "gamma"], ["normed"], name="/model/final_norm", epsilon=1e-6, axis=-1),
        helper.make_node("Gather", ["normed", "last"], ["picked"], name="/lm_head/prune/Gather", axis=1),
        helper.make_node("Unsqueeze", ["picked", "one"], ["head_in"], name="/lm_head/prune/Unsqueeze"),
        helper.make_node("MatMulNBits", ["head_in", "w", "s"], ["logits"], name=lq.LM_HEAD_NODE, domain="com.microsoft",
                         K=hidden, N=vocab, bits=8, block_size=32, accuracy_level=4),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if extra_use:
        nodes.append(helper.make_node("Identity", ["normed"], ["normed_copy"]))
        outputs.append(helper.make_tensor_value_info("normed_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, None, hidden])], outputs,
        initializer=[
            numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.array(-1, np.int64), "last"),
            numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(q, "w"),
            numpy_helper.from_array(scales, "s"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _fp32_logits(hidden: np.ndarray, gamma: np.ndarray, weight: np.ndarray) -> np.ndarray:
    last = hidden[0, -1]
    normed = last / np.sqrt(np.mean(last**2) + 1e-6) * gamma
    return normed @ weight.T


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_layout_is_what_matmulnbits_reads(bits):
    """onnxruntime's MatMulNBits (fp32 compute) over our packing equals numpy's matmul of the dequantized weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    q, scales = lq.quantize_blockwise(weight, bits, 32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["logits"], domain="com.microsoft",
                            K=HIDDEN, N=VOCAB, bits=bits, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, HIDDEN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(q, "w"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    x = rng.standard_normal((2, HIDDEN)).astype(np.float32)
    if bits == 4:
        q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(VOCAB, HIDDEN // 32, 32)
    dequantized = ((q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(VOCAB, HIDDEN)
    np.testing.assert_allclose(_run(model, {"x": x}), x @ dequantized.T, rtol=1e-4, atol=1e-4)
    assert np.abs(dequantized - weight).max() <= scales.max() / 2 + 1e-6


def test_smoothed_dqmm_head_keeps_the_logits():
    """Outlier channels in the activations: the smoothed per-channel head stays close to fp32."""
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[[3, 17]] = 40.0  # two outlier channels, as Gemma's final norm has
    hidden = rng.standard_normal((1, 24, HIDDEN)).astype(np.float32)
    model = _head_graph(weight, gamma)
    norm, scale_name = lq.final_norm(model.graph)
    assert norm.name == "/model/final_norm" and scale_name == "gamma"
    scales = lq.smoothing_scales(np.abs(hidden[0] / np.sqrt(np.mean(hidden[0] ** 2, -1, keepdims=True)) * gamma).max(0),
                                 lq.head_weight(model), 0.5)
    init = next(i for i in model.graph.initializer if i.name == "gamma")
    init.CopyFrom(numpy_helper.from_array(gamma / scales, "gamma"))
    lq.requantize_lm_head(model, lq.HeadScheme("dqmm", smooth_alpha=0.5), weight=lq.head_weight(model) * scales[None, :])
    head = next(n for n in model.graph.node if n.name == lq.LM_HEAD_NODE)
    assert head.op_type == "DynamicQuantizeMatMul"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[head.input[1]].dtype == np.int8 and inits[head.input[1]].shape == (HIDDEN, VOCAB)
    assert inits[head.input[2]].shape == (VOCAB,)
    reference = _fp32_logits(hidden, gamma, weight)
    assert _cosine(_run(model, {"hidden": hidden})[0, 0], reference) > 0.999


def test_unsmoothed_head_on_outliers_is_worse_than_smoothed():
    """The reason for smoothing: one activation scale per vector loses the small channels next to outliers."""
    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((VOCAB, HIDDEN)) * 0.05).astype(np.float32)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[[3, 17]] = 200.0
    weight[:, [3, 17]] *= 0.01  # the outliers carry little of the logits; the other channels carry the rest
    hidden = rng.standard_normal((1, 8, HIDDEN)).astype(np.float32)
    reference = _fp32_logits(hidden, gamma, weight)
    plain = _head_graph(weight, gamma)
    lq.requantize_lm_head(plain, lq.HeadScheme("dqmm"))
    smoothed = _head_graph(weight, gamma)
    normed = hidden[0] / np.sqrt(np.mean(hidden[0] ** 2, -1, keepdims=True)) * gamma
    scales = lq.smoothing_scales(np.abs(normed).max(0), weight, 0.5)
    next(i for i in smoothed.graph.initializer if i.name == "gamma").CopyFrom(numpy_helper.from_array(gamma / scales, "gamma"))
    lq.requantize_lm_head(smoothed, lq.HeadScheme("dqmm"), weight=lq.head_weight(smoothed) * scales[None, :])
    error = {name: 1 - _cosine(_run(m, {"hidden": hidden})[0, 0], reference) for name, m in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] < error["plain"] / 2, error


def test_a_norm_output_used_elsewhere_is_not_smoothed():
    """Rescaling the norm would change the other consumer too, so final_norm refuses (requantize_engine_head raises)."""
    rng = np.random.default_rng(3)
    model = _head_graph(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), np.ones(HIDDEN, np.float32), extra_use=True)
    assert lq.final_norm(model.graph) is None
    assert lq.final_norm(_head_graph(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), np.ones(HIDDEN, np.float32)).graph)


def test_int8_gqa_export_has_the_smoothed_per_row_head_and_layers(tiny_engine):
    """The options reach the graph: the tiny Gemma 3's int8 gqa engine validates with a per-row int8 head and
    o/gate/up projections (toolkit.export.w8a8), qkv/down on the builder's MatMulNBits."""
    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")
    manifest = load_manifest(engine_dir)
    assert manifest.validation["passed"], manifest.validation["failures"]
    assert manifest.export_options["lm_head"] == {"method": "MatMulIntegerToFloat", "bits": 8, "weights": "per-channel",
                                                  "activations": "per-row", "smooth_alpha": 0.5}
    model = onnx.load(str(engine_dir / "model.onnx"))
    layers = manifest.export_options["layers"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    vocab = inits["model.embed_tokens.weight"].shape[0]
    head = next(n for n in model.graph.node if n.name == f"{lq.LM_HEAD_NODE}/RowwiseInt8")
    assert head.op_type == "MatMulIntegerToFloat" and head.output[0] != "logits"
    assert inits[head.input[1]].dtype == np.int8 and inits[head.input[1]].shape == (64, vocab)
    assert inits[head.input[3]].shape == (vocab,)
    # per layer: o/gate/up per-row int8 from the checkpoint, qkv/down the builder's MatMulNBits (block 32, level 4)
    n_layers = sum(1 for n in model.graph.node if n.op_type == "GroupQueryAttention")
    converted = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat" and n.name.startswith("/model/layers.")]
    assert sorted({n.name.split("/")[4] for n in converted}) == ["gate_proj", "o_proj", "up_proj"]
    assert len(converted) == 3 * n_layers == layers["converted"] == layers["from_checkpoint"]
    body = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert sorted({n.name.split("/")[4] for n in body}) == ["down_proj", "qkv_proj"] and len(body) == 2 * n_layers
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in body)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in body)
    # gate and up read one quantized activation (one Abs per input, not per linear), smoothed through the norm
    assert sum(1 for n in model.graph.node if n.op_type == "Abs") == 2 * n_layers + 1
    assert layers["smoothed"] == n_layers
    fp32 = onnx.load(str(tiny_engine(get_recipe("default"), "fp32", "gqa") / "model.onnx"))
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    final = next(n for n in model.graph.node if n.name.endswith("/final_norm_layernorm/SkipLayerNorm"))
    gate_norm = next(n for n in model.graph.node if n.name == "/model/layers.0/pre_feedforward_layernorm/SkipLayerNorm")
    for name in (final.input[2], gate_norm.input[2]):  # divided by the smoothing scales, channel by channel
        ratio = fp32_inits[name] / inits[name]
        assert ratio.std() > 0.05 * ratio.mean()
    assert not any(p.name.startswith(("calibrate-", "requantize-")) for p in engine_dir.iterdir())


def test_the_head_scheme_is_part_of_the_int8_gqa_build_key(monkeypatch):
    """A cached int8 gqa engine built with another LM head scheme is rebuilt, not reused; other engines keep their key."""
    from toolkit.export import gqa_export
    from toolkit.export.sources import build_key

    recipe = get_recipe("default")
    before = {(p, g): build_key("sha", recipe, "onnx", p, g) for p in ("fp32", "int8") for g in ("gqa", "optimum")}
    monkeypatch.setattr(gqa_export, "INT8_HEAD", lq.HeadScheme("nbits", 8, 128, 4))
    after = {(p, g): build_key("sha", recipe, "onnx", p, g) for p in ("fp32", "int8") for g in ("gqa", "optimum")}
    assert [k for k in before if before[k] != after[k]] == [("int8", "gqa")]
    monkeypatch.setattr(gqa_export, "INT8_BODY", {"linears": ("attn/o_proj",), "smooth_alpha": 0.5})
    assert build_key("sha", recipe, "onnx", "int8", "gqa") != after[("int8", "gqa")]
