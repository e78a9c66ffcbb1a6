"""Per-row int8 linears (toolkit.export.rowwise_int8, toolkit.export.w8a8): numerics, row independence,
smoothing as an exact rewrite, the checkpoint as the weights' source, and a batch-invariant int8 engine."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.export import lm_head_quant as lq
from toolkit.export import rowwise_int8, w8a8
from toolkit.recipes.registry import get_recipe

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

K, N = 96, 80


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rowwise_model(weight: np.ndarray):
    graph = helper.make_graph([], "rowwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    rowwise_int8.add_constants(graph)
    nodes, q, scale = rowwise_int8.activation_nodes("x")
    nodes += rowwise_int8.linear_nodes(graph, "/linear", q, scale, weight, "y", "linear")
    graph.node.extend(nodes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The scheme in numpy: per-row symmetric int8 activations, per-column int8 weights, exact integer products."""
    row_scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / np.float32(127)
    q = np.rint(x / row_scale).astype(np.int64)
    w_q, col_scale = rowwise_int8.quantize_columns(weight)
    return (q @ w_q.astype(np.int64)).astype(np.float64) * col_scale * row_scale


def test_rowwise_linear_is_the_per_row_scheme_and_rows_are_independent():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((2, 7, K)).astype(np.float32) * np.linspace(0.1, 20, K, dtype=np.float32)
    session = _session(_rowwise_model(weight))
    together = session.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(together, _reference(x, weight), rtol=1e-5, atol=1e-4)
    # each token alone gives bitwise the same row as in the 14-token run (one scale per row, exact int32 sums)
    for b in range(2):
        for t in range(7):
            alone = session.run(["y"], {"x": x[b:b + 1, t:t + 1]})[0]
            assert np.array_equal(alone[0, 0], together[b, t])
    # and the int8 result is close to the fp32 product (a broken scale or zero point would not be)
    exact = x @ weight
    assert np.abs(together - exact).max() < 0.02 * np.abs(exact).max()


def _mlp_graph(gamma: np.ndarray, gate: np.ndarray, up: np.ndarray, extra_reader: bool = False):
    """x -> SimplifiedLayerNormalization(gamma) -> gate / up 8-bit MatMulNBits (the builder's names) -> outputs."""
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["normed"],
                              name="/model/layers.0/pre_feedforward_layernorm/LayerNorm", epsilon=1e-6, axis=-1)]
    inits = [numpy_helper.from_array(gamma, "gamma")]
    for kind, weight in (("gate_proj", gate), ("up_proj", up)):
        q, scales = lq.quantize_blockwise(np.ascontiguousarray(weight.T), 8, 32)
        inits += [numpy_helper.from_array(q, f"{kind}.q"), numpy_helper.from_array(scales, f"{kind}.s")]
        nodes.append(helper.make_node("MatMulNBits", ["normed", f"{kind}.q", f"{kind}.s"], [kind],
                                      name=f"/model/layers.0/mlp/{kind}/MatMul_Q8", domain="com.microsoft",
                                      K=K, N=N, bits=8, block_size=32, accuracy_level=4))
    outputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("gate_proj", "up_proj")]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["normed"], ["normed_copy"]))
        outputs.append(helper.make_tensor_value_info("normed_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def test_smoothing_is_an_exact_rewrite_and_needs_linears_as_the_only_readers():
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.5, 2, K).astype(np.float32)
    gate, up = (rng.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    model = _mlp_graph(gamma, gate, up)
    linears = w8a8.find_linears(model, ("mlp/gate_proj", "mlp/up_proj"))
    before = {name: linear.weight.copy() for name, linear in linears.items()}
    act_max = {"normed": rng.uniform(0.1, 50, K).astype(np.float32)}  # outlier channels up to 50
    assert w8a8.smooth(model.graph, linears, act_max, 0.5) == ["normed"]
    new_gamma = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gamma"))
    assert np.abs(new_gamma / gamma - 1).max() > 0.1  # the scales moved something
    for name, linear in linears.items():  # diag(gamma') W' == diag(gamma) W: the same product in real arithmetic
        np.testing.assert_allclose(new_gamma[:, None] * linear.weight, gamma[:, None] * before[name], rtol=1e-5, atol=1e-6)
    # a norm output that something else also reads cannot be rescaled
    shared = _mlp_graph(gamma, gate, up, extra_reader=True)
    assert w8a8.smoothable(shared.graph, w8a8.find_linears(shared, ("mlp/gate_proj", "mlp/up_proj"))) == {}


def test_converted_graph_computes_the_mlp_and_only_the_chosen_linears_change():
    rng = np.random.default_rng(2)
    gamma = np.ones(K, np.float32)
    gate, up = (rng.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    model = _mlp_graph(gamma, gate, up)
    w8a8.replace_linears(model.graph, w8a8.find_linears(model, ("mlp/up_proj",)))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["/model/layers.0/mlp/gate_proj/MatMul_Q8"] == "MatMulNBits"
    assert ops["/model/layers.0/mlp/up_proj/MatMul_Q8/RowwiseInt8"] == "MatMulIntegerToFloat"
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    got_gate, got_up = _session(model).run(["gate_proj", "up_proj"], {"x": x})
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    for got, weight in ((got_gate, gate), (got_up, up)):
        exact = normed @ weight
        assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


def test_weights_come_from_the_checkpoint_only_when_they_are_what_the_builder_quantized():
    rng = np.random.default_rng(3)
    gate, up = (rng.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    model = _mlp_graph(np.ones(K, np.float32), gate, up)
    hf = {"model.layers.0.mlp.gate_proj.weight": gate.T, "model.layers.0.mlp.up_proj.weight": up.T + 1.0}  # up: not its source

    linears = w8a8.find_linears(model, ("mlp/gate_proj", "mlp/up_proj"), tensors=hf.__getitem__)
    by_kind = {w8a8.node_kind(name): linear for name, linear in linears.items()}
    assert by_kind["mlp/gate_proj"].from_checkpoint and np.array_equal(by_kind["mlp/gate_proj"].weight, gate)
    assert not by_kind["mlp/up_proj"].from_checkpoint
    assert np.abs(by_kind["mlp/up_proj"].weight - up).max() < np.abs(up).max() / 100  # dequantized instead
    missing = w8a8.find_linears(model, ("mlp/gate_proj",), tensors={}.__getitem__)
    assert not any(linear.from_checkpoint for linear in missing.values())


def test_int8_gqa_engine_is_batch_invariant(tiny_engine):
    """A row's logits are bitwise the same decoded alone or beside other rows (every linear per-row int8 or
    MatMulNBits): what lets the validation's batched row and speculative verify runs see the batch-1 numbers."""
    from toolkit.runtime.gqa_runner import GqaModelRunner

    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")
    runner = GqaModelRunner(engine_dir / "model.onnx", threads=2)
    prompts = [[2, 17, 33, 90, 4], [2, 250, 6, 7], [2, 11, 12, 13, 14, 15, 16]]

    def decode(rows: list[int]) -> np.ndarray:
        batch = runner.new_batch()
        last = []
        for i in rows:
            logits, buffers = runner.prefill(prompts[i], None, 0)
            batch.add_rows(buffers, [len(prompts[i])])
            last.append(int(logits.argmax()))
        out = []
        for step in range(3):
            logits = runner.decode(batch, last, [len(prompts[i]) + step for i in rows])
            out.append(logits.copy())
            last = [int(v) for v in logits.argmax(axis=-1)]
        return np.stack(out, axis=1)  # [rows, steps, vocab]

    together = decode([0, 1, 2])
    for i in range(3):
        assert np.array_equal(decode([i])[0], together[i]), f"row {i} depends on its batch"
