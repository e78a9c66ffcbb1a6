"""Our int8 layer operators (``toolkit.artifact.native_linear``) against onnxruntime's own nodes.

``RowwiseInt8MatMul`` replaces the export's per-row int8 linear (``toolkit.export.rowwise_int8``: nine
nodes quantizing the input, ``MatMulIntegerToFloat``, ``Mul``) and must give its output bitwise;
``Int8BlockMatMul`` replaces 8-bit ``MatMulNBits`` (blocks of 32, ``accuracy_level`` 4) and must agree with
it to float rounding and with the definition (int8 blocks of the input, exact integer sums). Both must
give a row the same bits whatever rows run beside it. The engines' whole graphs run them in
``tests/test_gqa.py``, ``tests/test_speculative.py`` and ``toolkit validate``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.artifact import native_linear
from toolkit.export import rowwise_int8

OPERATORS_HERE = native_linear.available()
needs_operators = pytest.mark.skipif(not OPERATORS_HERE, reason="the CPU lacks AVX-512 VNNI or no C compiler; the graph "
                                     "keeps onnxruntime's operators (test_without_the_operators_nothing_changes)")
ROWS = [1, 3, 8, 13, 33, 70]  # every row group (8, 4, 2, 1 and 4, 2, 1), past the serial quantization and a 64-row chunk


def _model(nodes, initializers, k, outputs, domains=("com.microsoft",)):
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  *(helper.make_opsetid(d, 1) for d in domains)])


def _rowwise_model(weights: list[np.ndarray]):
    """The export's per-row int8 linear: ``x`` quantized once, one product per weight (as gate and up share it)."""
    graph = helper.make_graph([], "g", [], [])
    rowwise_int8.add_constants(graph)
    quantize, q, scale = rowwise_int8.activation_nodes("x")
    nodes = list(quantize)
    for i, w in enumerate(weights):
        nodes += rowwise_int8.linear_nodes(graph, f"p{i}", q, scale, w, f"y{i}", f"w{i}")
    return _model(nodes, list(graph.initializer), weights[0].shape[0], [f"y{i}" for i in range(len(weights))])


def _block_model(b: np.ndarray, scales: np.ndarray, k: int, n: int, **overrides):
    attrs = {"K": k, "N": n, "bits": 8, "block_size": 32, "accuracy_level": 4, **overrides}
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", **attrs)
    return _model([node], [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")], k, ["y"])


def _session(model, threads=2):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if native_linear.uses_operators(model):
        options.register_custom_ops_library(str(native_linear.library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _swapped(model):
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    return ours, native_linear.swap_linears(ours)


def _inputs(rng, rows, k):
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 30, (rows, 1))).astype(np.float32)
    if rows > 1:
        x[1, :] = 0.0  # an all-zero row: the 1e-12 floor of the row scale (a zero block scale in MatMulNBits)
    if rows > 2:
        x[2, 5] = 1e4  # one outlier: the rest of its row rounds to few levels
    return x


@needs_operators
@pytest.mark.parametrize("rows", ROWS)
def test_rowwise_is_bitwise_the_exported_nodes(rows):
    rng = np.random.default_rng(rows)
    k, widths = 36, (100, 48)  # K not a multiple of 16, N of neither the 16-column block nor the 48-column tile
    weights = [rng.standard_normal((k, n)).astype(np.float32) for n in widths]
    model = _rowwise_model(weights)
    ours, swapped = _swapped(model)
    assert swapped == 2
    x = _inputs(rng, rows, k)
    theirs = _session(model).run(None, {"x": x})
    mine = _session(ours).run(None, {"x": x})
    for a, b in zip(theirs, mine):
        np.testing.assert_array_equal(a, b)


@needs_operators
def test_rowwise_swap_removes_the_quantizing_nodes_only_when_nothing_else_reads_them():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((32, 40)).astype(np.float32) for _ in range(2)]
    ours, swapped = _swapped(_rowwise_model(weights))
    assert swapped == 2
    assert sorted(n.op_type for n in ours.graph.node) == ["RowwiseInt8MatMul"] * 2
    assert not {"rowwise_int8.one", "rowwise_int8.qmax", "rowwise_int8.zero_point"} & {i.name for i in ours.graph.initializer}
    # another reader of the quantized input (here a graph output) keeps its chain
    model = _rowwise_model(weights)
    q = next(n.output[0] for n in model.graph.node if n.op_type == "Cast")
    model.graph.output.append(helper.make_tensor_value_info(q, TensorProto.UINT8, None))
    kept, swapped = _swapped(model)
    assert swapped == 2 and {"Abs", "Round", "Cast"} <= {n.op_type for n in kept.graph.node}
    x = _inputs(rng, 5, 32)
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[2], _session(kept).run(None, {"x": x})[2])


def _block_weights(rng, k, n):
    return (rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8),
            (rng.random(n * (k // 32), dtype=np.float32) * 0.02 + 1e-3).astype(np.float32))


def _block_definition(x, b, scales):
    """MatMulNBits at accuracy level 4, in float64 from its definition: each block of 32 of a row quantized to
    int8 (scale max|x| / 127, round half to even), the integer sums with B - 128 exact, scaled by both scales."""
    rows, k = x.shape
    n = b.shape[0]
    blocks = x.reshape(rows, k // 32, 32)
    a_scale = np.abs(blocks).max(axis=2) / np.float32(127)
    inverse = np.where(a_scale > 0, np.float32(1) / np.where(a_scale > 0, a_scale, 1), 0).astype(np.float32)
    qa = np.rint(blocks * inverse[:, :, None]).astype(np.int64)
    wb = b.astype(np.int64) - 128
    sums = np.einsum("mbk,nbk->mnb", qa, wb)
    return (sums * a_scale[:, None, :].astype(np.float64) * scales.reshape(n, k // 32)[None].astype(np.float64)).sum(axis=2)


@needs_operators
@pytest.mark.parametrize("rows", ROWS)
def test_block_matches_matmulnbits_and_its_definition(rows):
    rng = np.random.default_rng(100 + rows)
    k, n = 96, 100
    b, scales = _block_weights(rng, k, n)
    model = _block_model(b, scales, k, n)
    ours, swapped = _swapped(model)
    assert swapped == 1 and ours.graph.node[0].op_type == "Int8BlockMatMul"
    x = _inputs(rng, rows, k)
    theirs = _session(model).run(None, {"x": x})[0]
    mine = _session(ours).run(None, {"x": x})[0]
    scale = np.abs(theirs).max()
    assert np.abs(mine - theirs).max() <= 2e-6 * scale
    assert np.abs(mine - _block_definition(x, b, scales)).max() <= 2e-6 * scale
    # a wrong zero point (0 instead of 128) or a block's scale read from the wrong column would be far off
    assert np.abs(theirs).max() > 1.0


@needs_operators
@pytest.mark.parametrize("kind", ["rowwise", "block"])
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(kind):
    rng = np.random.default_rng(7)
    k, n = 64, 120
    if kind == "rowwise":
        model = _swapped(_rowwise_model([rng.standard_normal((k, n)).astype(np.float32)]))[0]
    else:
        model = _swapped(_block_model(*_block_weights(rng, k, n), k, n))[0]
    assert native_linear.uses_operators(model)
    session = _session(model)
    x = _inputs(rng, 70, k)
    batch = session.run(None, {"x": x})[0]
    for row in (0, 1, 2, 9, 37, 69):  # alone, and at other places of smaller batches
        np.testing.assert_array_equal(session.run(None, {"x": x[row:row + 1]})[0][0], batch[row])
        np.testing.assert_array_equal(session.run(None, {"x": x[row:row + 13]})[0][0], batch[row])


@needs_operators
@pytest.mark.parametrize("change", [{"bits": 4}, {"block_size": 16}, {"accuracy_level": 0}, "zero_points", "a_scale"])
def test_other_forms_keep_onnxruntimes_operators(change):
    rng = np.random.default_rng(3)
    if change == "a_scale":  # a per-row linear whose activation scale is not 1 is not the export's pattern
        model = _rowwise_model([rng.standard_normal((32, 40)).astype(np.float32)])
        one = next(i for i in model.graph.initializer if i.name == "rowwise_int8.one")
        one.CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32), one.name))
    elif change == "zero_points":
        b, scales = _block_weights(rng, 64, 40)
        model = _block_model(b, scales, 64, 40)
        node = model.graph.node[0]
        node.input.append("Z")
        model.graph.initializer.append(numpy_helper.from_array(np.full(40 * 2, 128, np.uint8), "Z"))
    else:
        b, scales = _block_weights(rng, 64, 40)
        model = _block_model(b, scales, 64, 40, **change)
    before = model.SerializeToString()
    assert native_linear.swap_linears(model) == 0
    assert model.SerializeToString() == before


@needs_operators
def test_an_input_of_the_wrong_width_is_a_clear_error_and_the_session_runs_on():
    rng = np.random.default_rng(5)
    model = _swapped(_block_model(*_block_weights(rng, 64, 40), 64, 40))[0]
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "k"  # let a wrong width reach the kernel
    session = _session(model)
    with pytest.raises(Exception, match="last dimension 32, the weight's K 64"):
        session.run(None, {"x": np.ones((2, 32), np.float32)})
    assert session.run(None, {"x": np.ones((2, 64), np.float32)})[0].shape == (2, 40)


def test_without_the_operators_nothing_changes(monkeypatch):
    """Switched off (or, as on a CPU without AVX-512 VNNI, unavailable): the graph keeps onnxruntime's nodes."""
    monkeypatch.setenv(native_linear.ENV_SWITCH, "0")
    rng = np.random.default_rng(1)
    for model in (_rowwise_model([rng.standard_normal((32, 40)).astype(np.float32)]),
                  _block_model(*_block_weights(rng, 64, 40), 64, 40)):
        before = model.SerializeToString()
        assert native_linear.swap_linears(model) == 0 and model.SerializeToString() == before
    assert native_linear.unavailable_reason() == f"${native_linear.ENV_SWITCH}=0"
    monkeypatch.delenv(native_linear.ENV_SWITCH)
    assert native_linear.unavailable_reason(frozenset({"avx512f", "avx512bw"})) == "the CPU lacks avx512_vnni"


@needs_operators
def test_weights_fed_as_inputs_are_packed_at_every_run():
    """Initializers are packed when the session is made; a weight that is a graph input instead is packed at
    every run: other values in a later run (here in the same array, so at the same address) are used."""
    rng = np.random.default_rng(11)
    k, n = 64, 50
    node = helper.make_node("Int8BlockMatMul", ["x", "B", "S"], ["y"], domain=native_linear.DOMAIN, K=k, N=n, bits=8,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "fed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k]),
                                              helper.make_tensor_value_info("B", TensorProto.UINT8, [n, k // 32, 32]),
                                              helper.make_tensor_value_info("S", TensorProto.FLOAT, [n * (k // 32)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native_linear.DOMAIN, 1)])
    session = _session(model)
    x = _inputs(rng, 5, k)
    b, scales = _block_weights(rng, k, n)
    for _ in range(2):
        b[...], scales[...] = _block_weights(rng, k, n)
        y = session.run(None, {"x": x, "B": b, "S": scales})[0]
        assert np.abs(y - _block_definition(x, b, scales)).max() <= 2e-6 * np.abs(y).max()


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    resident, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


@needs_operators
def test_packed_weights_do_not_stay_resident_twice(tmp_path):
    """onnxruntime maps an engine's external data file; once a weight is packed its file pages are handed
    back (MADV_PAGEOUT), so the process holds the packed copy and not also the original."""
    rng = np.random.default_rng(13)
    k, n = 2048, 2048  # 4 MiB of int8 weights
    b, scales = _block_weights(rng, k, n)
    model = _block_model(b, scales, k, n)
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    loaded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert native_linear.swap_linears(loaded) == 1
    from toolkit.artifact.onnx_session import create_session

    session = create_session(tmp_path / "model.onnx", 2, model=loaded, custom_ops=[native_linear.library()])
    x = _inputs(rng, 4, k)
    y = session.run(None, {"x": x})[0]
    assert np.abs(y - _block_definition(x, b, scales)).max() <= 2e-6 * np.abs(y).max()
    data = tmp_path / "weights.bin"
    if not any(str(data) in line for line in open("/proc/self/maps")):
        pytest.skip("this onnxruntime copied the external data instead of mapping it: nothing to hand back")
    if not _kernel_pages_out():
        pytest.skip("this Linux kernel has no MADV_PAGEOUT (5.4+): the pages stay until the kernel needs them")
    assert _mapped_kib(data) < 0.25 * data.stat().st_size / 1024


def _kernel_pages_out() -> bool:
    """Whether madvise(MADV_PAGEOUT) works here (what the operator asks of the kernel; 21 on Linux)."""
    import mmap

    scratch = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        scratch.madvise(getattr(mmap, "MADV_PAGEOUT", 21))
    except OSError:
        return False
    finally:
        scratch.close()
    return True
