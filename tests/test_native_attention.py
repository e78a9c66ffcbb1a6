"""Our GroupQueryAttention operator (``toolkit.artifact.native_attention``) against onnxruntime's own.

Each case runs one ``GroupQueryAttention`` node twice, as exported (domain ``com.microsoft``) and re-pointed
at our operator, on the same inputs: outputs within float32 rounding, caches the same at every live
position. The engines' runs of the whole graph are compared in ``tests/test_gqa.py`` and, against the fp32
reference, by ``toolkit validate`` (``toolkit.export.ort_runner`` runs our operator too).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.artifact import native_attention, native_build


OPERATOR_HERE = native_attention.available()
needs_operator = pytest.mark.skipif(not OPERATOR_HERE, reason="the CPU lacks AVX-512 or no C compiler; the graph keeps "
                                    "onnxruntime's operator (test_swap_without_the_operator_changes_nothing)")


def _node_model(domain: str, heads=4, kv=1, head=32, window=-1, rotary=1, softcap=0.0, scale=0.0, packed=False,
                positions=256, extra_inputs=(), **attributes):
    """One GroupQueryAttention node with the builder's inputs (cos/sin tables as initializers)."""
    inv = 1.0 / (10000 ** (np.arange(head // 2) * 2 / head))
    angles = np.arange(positions)[:, None] * inv[None, :]
    f = TensorProto.FLOAT
    qkv = ["q", "", ""] if packed else ["q", "k", "v"]
    node = helper.make_node("GroupQueryAttention", [*qkv, "pk", "pv", "sl", "tot", "cos", "sin", *extra_inputs],
                            ["o", "ok", "ov"], domain=domain, num_heads=heads, kv_num_heads=kv, local_window_size=window,
                            do_rotary=rotary, softcap=softcap, scale=scale, **attributes)
    width = (heads + 2 * kv) * head if packed else heads * head
    inputs = [helper.make_tensor_value_info("q", f, ["b", "s", width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f, ["b", "s", kv * head]) for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info(n, f, ["b", kv, "p", head]) for n in ("pk", "pv")]
    inputs += [helper.make_tensor_value_info("sl", TensorProto.INT32, ["b"]), helper.make_tensor_value_info("tot", TensorProto.INT32, [])]
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")],
                              [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                               numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])


def _session(model, threads=2):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if native_attention.uses_operator(model):
        options.register_custom_ops_library(str(native_attention.library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _sessions(threads=2, cache="float32", **shape):
    """onnxruntime's node and ours (over a ``cache`` cache), swapped by ``swap_attention`` from the same model."""
    theirs = _node_model("com.microsoft", **shape)
    ours = _node_model("com.microsoft", **shape)
    assert native_attention.swap_attention(ours, shape.get("head", 32), cache)
    return _session(theirs, threads), _session(ours, threads)


def _as_cache(feeds, cache):
    """``feeds`` with the past key/value in the cache's element type."""
    return {**feeds, "pk": feeds["pk"].astype(cache), "pv": feeds["pv"].astype(cache)}


def _feeds(rng, rows, new, cached, capacity, heads=4, kv=1, head=32, packed=False, first_prompt=False):
    """Inputs for ``rows`` rows of ``cached[i]`` cached tokens each getting ``new`` tokens."""
    width = (heads + 2 * kv) * head if packed else heads * head
    feeds = {"q": rng.standard_normal((rows, new, width)).astype(np.float32)}
    if not packed:
        feeds["k"] = rng.standard_normal((rows, new, kv * head)).astype(np.float32)
        feeds["v"] = rng.standard_normal((rows, new, kv * head)).astype(np.float32)
    feeds["pk"] = rng.standard_normal((rows, kv, capacity, head)).astype(np.float32)
    feeds["pv"] = rng.standard_normal((rows, kv, capacity, head)).astype(np.float32)
    cached = np.asarray(cached, np.int32)
    feeds["sl"] = (cached + new - 1).astype(np.int32)
    feeds["tot"] = np.array(new if first_prompt else int(cached.max()) + new, np.int32)
    return feeds


def _run(session, feeds, shared: bool):
    """Outputs and the caches after the run; ``shared``: present bound to the past's memory, as the engine runs."""
    if not shared:
        return session.run(None, feeds)
    pk, pv = feeds["pk"].copy(), feeds["pv"].copy()
    binding = session.io_binding()
    for name in ("q", "k", "v", "sl", "tot"):
        if name in feeds:
            binding.bind_cpu_input(name, feeds[name])
    binding.bind_output("o")  # first: get_outputs() lists the bound outputs in binding order
    for name, array, out in (("pk", pk, "ok"), ("pv", pv, "ov")):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(out, value)
    session.run_with_iobinding(binding)
    output = binding.get_outputs()[0].numpy()
    assert output.shape == (feeds["q"].shape[0], feeds["q"].shape[1], output.shape[2])
    return [output, pk, pv]


def _assert_same_attention(theirs, ours, live):
    """Outputs within float32 rounding; caches equal up to each row's length ``live[row]``."""
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=2e-5)
    for a, b in zip(theirs[1:], ours[1:]):
        assert a.shape == b.shape
        for row, length in enumerate(live):
            np.testing.assert_allclose(b[row, :, :length], a[row, :, :length], rtol=1e-6, atol=1e-6)


def test_the_function_table_positions_are_this_onnxruntime_s():
    """The C source reaches onnxruntime's C API by positions in its function table: a status made through
    it reads back through it, on the onnxruntime library of the installed wheel."""
    if not OPERATOR_HERE:
        assert native_attention.swap_attention(_node_model("com.microsoft"), 32) is False
        return
    capi = Path(ort.__file__).parent / "capi"
    runtime_lib = ctypes.CDLL(str(next(capi.glob("libonnxruntime.so*"))), mode=ctypes.RTLD_LOCAL)
    runtime_lib.OrtGetApiBase.restype = ctypes.c_void_p
    ours = ctypes.CDLL(str(native_attention.library()))
    ours.toolkit_gqa_api_check.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    version = ctypes.create_string_buffer(64)
    assert ours.toolkit_gqa_api_check(runtime_lib.OrtGetApiBase(), version, 64) == 0
    assert version.value.decode() == ort.__version__


@needs_operator
@pytest.mark.parametrize("shared", [True, False], ids=["shared-cache", "copied-cache"])
@pytest.mark.parametrize("shape", [
    {},
    {"packed": True},
    {"window": 5},
    {"heads": 8, "kv": 2, "head": 64, "softcap": 3.0, "scale": 0.3},
    {"rotary": 0, "window": 9},
], ids=["plain", "packed", "window", "groups-softcap-scale", "no-rotary"])
def test_decode_rows_of_different_lengths_match_onnxruntime(shape, shared):
    rng = np.random.default_rng(len(str(shape)))
    theirs, ours = _sessions(**shape)
    cached = [17, 3, 30, 11]
    feeds = _feeds(rng, 4, 1, cached, 32, **{k: v for k, v in shape.items() if k in ("heads", "kv", "head", "packed")})
    _assert_same_attention(_run(theirs, feeds, shared), _run(ours, feeds, shared), [c + 1 for c in cached])


@needs_operator
@pytest.mark.parametrize("window", [-1, 6])
def test_a_first_prompt_and_a_chunk_after_a_cache_match_onnxruntime(window):
    rng = np.random.default_rng(7)
    theirs, ours = _sessions(window=window)
    prompt = _feeds(rng, 1, 13, [0], 0, first_prompt=True)
    _assert_same_attention(_run(theirs, prompt, False), _run(ours, prompt, False), [13])
    chunk = _feeds(rng, 1, 9, [20], 40)  # positions 20-28 against 20 cached ones, past a 6-token window
    for shared in (True, False):
        _assert_same_attention(_run(theirs, chunk, shared), _run(ours, chunk, shared), [29])


@needs_operator
@pytest.mark.parametrize("shape", [{}, {"packed": True, "window": 5}], ids=["plain", "packed-window"])
def test_a_float16_cache_matches_onnxruntime_within_its_rounding(shape):
    """Over a float16 cache the new keys (rotated) and values are stored rounded to nearest, and the
    attention reads them back exactly: onnxruntime's float32 node fed the same rounded past gives the
    same output within float16 rounding of the new token's key and value."""
    rng = np.random.default_rng(11)
    theirs, ours = _sessions(cache="float16", **shape)
    cached = [17, 3, 30, 11]
    feeds = _feeds(rng, 4, 1, cached, 32, packed=shape.get("packed", False))
    rounded = {**feeds, "pk": feeds["pk"].astype(np.float16).astype(np.float32),
               "pv": feeds["pv"].astype(np.float16).astype(np.float32)}
    expected = _run(theirs, rounded, shared=True)
    got = _run(ours, _as_cache(feeds, "float16"), shared=True)
    assert got[1].dtype == got[2].dtype == np.float16
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=4e-3)
    for mine, reference in zip(got[1:], expected[1:]):
        for row, length in enumerate(cached):  # earlier positions untouched; the new one rounded from float32
            assert np.array_equal(mine[row, :, :length], reference[row, :, :length].astype(np.float16))
            np.testing.assert_allclose(mine[row, :, length].astype(np.float32), reference[row, :, length], rtol=1e-3, atol=1e-6)


@needs_operator
@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_a_row_s_output_is_bitwise_the_same_in_steps_in_a_chunk_and_in_a_batch(cache):
    """Six tokens one per run, as one chunk, and as a 3-row batch of 6-token drafts (the form onnxruntime's
    operator refuses): the same bits, so speculative verification reproduces plain decoding."""
    rng = np.random.default_rng(3)
    _, ours = _sessions(window=8, cache=cache)
    cached, new = [10, 4, 15], 6
    feeds = _as_cache(_feeds(rng, 3, new, cached, 32), cache)
    batch = _run(ours, feeds, shared=True)
    for row, length in enumerate(cached):
        single = {name: feeds[name][row:row + 1] for name in ("q", "k", "v", "pk", "pv")}
        chunk = _run(ours, {**single, "sl": np.array([length + new - 1], np.int32), "tot": np.array(length + new, np.int32)}, True)
        cache_k, cache_v = single["pk"].copy(), single["pv"].copy()
        for step in range(new):
            one = {"q": single["q"][:, step:step + 1], "k": single["k"][:, step:step + 1], "v": single["v"][:, step:step + 1],
                   "pk": cache_k, "pv": cache_v, "sl": np.array([length + step], np.int32), "tot": np.array(length + step + 1, np.int32)}
            out, cache_k, cache_v = _run(ours, one, shared=True)
            for got in (batch[0][row, step], chunk[0][0, step]):
                assert np.array_equal(got.view(np.uint32), out[0, 0].view(np.uint32))
        for got in (batch[1][row], chunk[1][0]):
            assert got.dtype == np.dtype(cache) and np.array_equal(got[:, :length + new], cache_k[0][:, :length + new])


@needs_operator
def test_a_row_longer_than_its_cache_is_a_clear_error_and_the_session_runs_on():
    rng = np.random.default_rng(5)
    _, ours = _sessions()
    good = _feeds(rng, 2, 1, [5, 9], 16)
    bad = {**good, "sl": np.array([5, 40], np.int32), "tot": np.array(41, np.int32)}
    with pytest.raises(Exception, match="row 1's length 41 does not fit the cache"):
        _run(ours, bad, shared=True)
    before = _run(ours, good, shared=True)[0]
    assert np.isfinite(before).all() and np.array_equal(before, _run(ours, good, shared=True)[0])


def test_swap_refuses_other_forms_and_leaves_the_graph_unchanged(monkeypatch):
    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    refused = [(_node_model("com.microsoft", rotary_interleaved=1), 32),  # interleaved rotary
               (_node_model("com.microsoft", extra_inputs=("position_ids",)), 32),  # an input past the nine
               (_node_model("com.microsoft", head=24), 24),  # not a multiple of 16
               (_node_model("com.microsoft", heads=34, kv=2), 32),  # 17 query heads per key/value head
               (_node_model("com.microsoft"), 64)]  # rotary tables not half the head size
    for model, head in refused:
        before = model.SerializeToString()
        assert native_attention.swap_attention(model, head) is False
        assert model.SerializeToString() == before
    model = _node_model("com.microsoft")
    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    assert native_attention.unavailable_reason() == "$TOOLKIT_NATIVE_ATTENTION=0"
    assert native_attention.swap_attention(model, 32) is False and not native_attention.uses_operator(model)


@needs_operator
def test_a_float16_cache_retypes_the_graph_s_cache_and_needs_it_to_feed_the_attention_alone():
    from onnx import TensorProto

    model = _node_model("com.microsoft")
    assert native_attention.swap_attention(model, 32, "float16")
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert {types[n] for n in ("pk", "pv", "ok", "ov")} == {TensorProto.FLOAT16}
    assert {types[n] for n in ("q", "k", "v", "o")} == {TensorProto.FLOAT}
    assert model.graph.node[0].op_type == native_attention.F16_CACHE_OP
    shared = _node_model("com.microsoft")
    shared.graph.node.append(helper.make_node("Shape", ["pk"], ["pk_shape"]))  # the cache read by another node
    before = shared.SerializeToString()
    assert native_attention.swap_attention(shared, 32, "float16") is False and shared.SerializeToString() == before
    assert native_attention.swap_attention(shared, 32, "float32")  # a float32 cache may feed anything


def test_the_cache_type_follows_the_precision_unless_set(monkeypatch):
    monkeypatch.delenv(native_attention.CACHE_ENV, raising=False)
    assert [native_attention.cache_dtype(p) for p in ("fp32", "int8", "fp16")] == ["float32", "float16", "float16"]
    monkeypatch.setenv(native_attention.CACHE_ENV, "float32")
    assert native_attention.cache_dtype("int8") == "float32"
    monkeypatch.setenv(native_attention.CACHE_ENV, "bfloat16")
    with pytest.raises(ValueError, match="use float16 or float32"):
        native_attention.cache_dtype("int8")


def test_swap_without_the_operator_changes_nothing(monkeypatch):
    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    assert native_attention.unavailable_reason(frozenset({"avx2", "fma"})) == "the CPU lacks avx512f"
    monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset({"avx2"}))
    model = _node_model("com.microsoft")
    before = model.SerializeToString()
    assert native_attention.swap_attention(model, 32) is False and model.SerializeToString() == before


def test_an_int8_engine_keeps_its_cache_in_float16_and_counts_it_so(tiny_engine, monkeypatch):
    """The engine's KV accounting (budget, /metrics) uses the element type its runner's buffers hold."""
    import asyncio

    from toolkit.recipes import get_recipe
    from toolkit.runtime import load_engine

    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")
    monkeypatch.delenv(native_attention.CACHE_ENV, raising=False)

    async def loaded(switch):
        monkeypatch.setenv(native_attention.ENV_SWITCH, switch)
        engine = load_engine(engine_dir)
        await engine.start()
        seen = (engine.kv_cache_dtype, engine.kv.geometry.bytes_per_token, engine.runner.spec.dtype,
                {b.dtype for b in engine.batch.buffers.values()} if hasattr(engine.batch, "buffers") else set())
        await engine.stop()
        return seen, native_attention.available()

    ours, here = asyncio.run(loaded("1"))
    theirs, _ = asyncio.run(loaded("0"))
    assert theirs[0] is None and theirs[2] == np.float32
    if here:
        assert ours[0] == "float16" and ours[2] == np.float16 and ours[3] <= {np.dtype(np.float16)}
        assert ours[1] * 2 == theirs[1]
    else:
        assert ours == theirs


def test_without_a_compiler_the_graph_keeps_onnxruntime_s_attention(tmp_path, monkeypatch):
    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))  # no library built yet
    monkeypatch.setenv("CC", "no-such-compiler-here")
    model = _node_model("com.microsoft")
    before = model.SerializeToString()
    assert not native_attention.available()
    assert native_attention.swap_attention(model, 32) is False and model.SerializeToString() == before


def test_serve_s_kv_cache_dtype_reaches_the_engine(tiny_engine, monkeypatch):
    """``toolkit serve --kv-cache-dtype`` (``engine_options``, the same dict Ray replicas get) over the default."""
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.recipes import get_recipe
    from toolkit.server.serve import engine_options, load_engines

    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    monkeypatch.delenv(native_attention.CACHE_ENV, raising=False)
    default = get_recipe("default")
    engine_dir = tiny_engine(default, "int8", "gqa")
    options = engine_options(kv_cache_dtype="float32")
    assert options["memory"]["kv_cache_dtype"] == "float32" and "kv_cache_dtype" not in engine_options()["memory"]
    chosen = load_engines([engine_dir], memory=options["memory"])[default.name]
    by_default = load_engines([engine_dir])[default.name]
    here = native_attention.available()
    assert (chosen.kv_cache_dtype, by_default.kv_cache_dtype) == (("float32", "float16") if here else (None, None))
    result = CliRunner().invoke(main, ["serve", str(engine_dir), "--kv-cache-dtype", "bfloat16"])
    assert result.exit_code == 2 and "--kv-cache-dtype" in result.output
