"""The int8 LM head on our own VNNI kernel (``toolkit.runtime.native_head``): bitwise the graph's logits.

Where the kernel cannot run (a CPU without AVX-512 VNNI, a machine other than x86-64, no C compiler),
those tests check instead that the graph keeps its own head: the branch is on this machine, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.recipes import get_recipe
from toolkit.runtime import native_head
from toolkit.artifact import native_build
from toolkit.artifact.native_build import cpu_flags
from toolkit.runtime.native_head import (Int8Head, build_library, reference_model, reference_session, split_lm_head,
                                         unavailable_reason)


def _kernel_here() -> bool:
    """Whether the runner will use the kernel on this machine: the CPU can run it and a compiler builds it."""
    if unavailable_reason(cpu_flags()) is not None or not native_build.is_x86_64():
        return False
    try:
        native_head.load_library()
    except (RuntimeError, OSError):
        return False
    return True


KERNEL_HERE = _kernel_here()


def _exact_logits(q: np.ndarray, weight: np.ndarray, col_scale: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """The definition in integers, then the two float32 products in onnxruntime's order."""
    acc = q.astype(np.int64) @ weight.astype(np.int64) - 128 * weight.astype(np.int64).sum(axis=0)
    return (acc.astype(np.float32) * col_scale) * row_scale.reshape(-1, 1)


def _onnxruntime_logits(q, weight, col_scale, row_scale) -> np.ndarray:
    """The exported head's ops (``MatMulIntegerToFloat``, ``Mul``) run by onnxruntime."""
    return reference_session(weight, col_scale).run(None, {"q": q, "rs": row_scale.reshape(-1, 1)})[0]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_cpu_flags_and_the_switch_decide_availability(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    flags = cpu_flags(cpuinfo)
    assert {"avx2", "avx512f", "avx512bw"} <= flags and "avx512_vnni" not in flags
    monkeypatch.delenv(native_head.ENV_SWITCH, raising=False)
    assert unavailable_reason(flags) == "the CPU lacks avx512_vnni"
    assert unavailable_reason(flags | {"avx512_vnni"}) is None
    monkeypatch.setenv(native_head.ENV_SWITCH, "0")
    assert unavailable_reason(flags | {"avx512_vnni"}) == "$TOOLKIT_NATIVE_HEAD=0"
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_other_machines_than_x86_64_are_refused_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(native_head.ENV_SWITCH, raising=False)
    assert unavailable_reason() == "the machine is aarch64, not x86-64"
    with pytest.raises(RuntimeError, match="x86-64 code"):
        build_library(out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_failing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    if not native_build.is_x86_64():  # refused before any compiler runs (the test above)
        assert unavailable_reason() is not None
        return
    monkeypatch.setenv("CC", "false")  # exists, exits 1
    with pytest.raises(RuntimeError, match="false failed on lm_head_int8.c"):
        build_library(out_dir=tmp_path)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C compiler"):
        build_library(out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))


def test_the_library_is_built_once_per_source(tmp_path):
    if not native_build.is_x86_64():
        with pytest.raises(RuntimeError, match="x86-64 code"):
            build_library(out_dir=tmp_path)
        return
    first = build_library(out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_library(out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    copy = tmp_path / "src"
    copy.mkdir()
    for header in native_head.SOURCE.parent.glob("*.h"):  # what its #include "..." needs
        (copy / header.name).write_text(header.read_text())
    edited = copy / "lm_head_int8.c"
    edited.write_text(native_head.SOURCE.read_text() + "\n/* another source, another library */\n")
    before = build_library(edited, out_dir=tmp_path)
    assert before != first
    (copy / "int8_tiles.h").write_text((copy / "int8_tiles.h").read_text() + "\n/* an edited header */\n")
    assert build_library(edited, out_dir=tmp_path) != before


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 17, 33])
def test_kernel_is_bitwise_the_definition_and_onnxruntime(rows, tmp_path):
    """The head's two ops as a model of their own, split as the runner splits an engine's graph: every
    row-tile size (8, 4, 2, 1 and their sums) and a vocabulary that is not a multiple of the 16-column
    block nor of the 48-column tile (the masked, padded edge). Where the kernel cannot run here, the
    split declines and the model keeps its head."""
    rng = np.random.default_rng(rows)
    k, n = 96, 1000
    weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
    col_scale = (rng.random(n, dtype=np.float32) * 0.02).astype(np.float32)
    q = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    q[0, :] = 255  # the largest products the int32 sums must hold exactly
    row_scale = (rng.random(rows, dtype=np.float32) * 0.1).astype(np.float32)
    model = reference_model(weight, col_scale)
    split = split_lm_head(model, tmp_path, 2)
    if not KERNEL_HERE:
        assert split is None and [o.name for o in model.graph.output] == ["logits"]
        return
    assert split is not None and (split.q_output, split.scale_output) == ("q", "rs")
    assert [o.name for o in model.graph.output] == ["q", "rs"] and not model.graph.node
    expected = _exact_logits(q, weight, col_scale, row_scale)
    assert _same_bits(expected, _onnxruntime_logits(q, weight, col_scale, row_scale))
    out = np.full((rows, n), np.nan, np.float32)
    for threads in (1, 2, 3):
        out[:] = np.nan
        Int8Head(weight, col_scale, threads)(q, row_scale.reshape(rows, 1), out)
        assert _same_bits(out, expected)
    out[:] = np.nan
    assert _same_bits(split.head(q, row_scale.reshape(rows, 1), out), expected)


@pytest.mark.parametrize("rows,n,threads", [(1, 1000, 1), (3, 1000, 2), (16, 4099, 2), (17, 997, 3), (9, 48, 2), (5, 17, 1)])
def test_fused_argmax_is_numpys(rows, n, threads, tmp_path):
    """The argmax the kernel finds while it computes is ``np.argmax`` of the rows it wrote: ties to the
    first column (two equal columns, one row of zeros: every value equal), a row of NaN is -1, the
    logits themselves unchanged by asking for it. Where the kernel cannot run, the split declines."""
    rng = np.random.default_rng(rows * n)
    k = 64
    weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
    col_scale = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    weight[:, 11 % n] = weight[:, 3 % n]
    col_scale[11 % n] = col_scale[3 % n]
    q = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    q[0] = 128  # the zero point: every logit of row 0 is 0, the first column wins
    row_scale = (rng.random((rows, 1), dtype=np.float32) + 0.1).astype(np.float32)
    split = split_lm_head(reference_model(weight, col_scale), tmp_path, threads)
    if not KERNEL_HERE:
        assert split is None
        return
    head = split.head
    plain, out, argmax = np.empty((rows, n), np.float32), np.empty((rows, n), np.float32), np.full(rows, -7, np.int32)
    head(q, row_scale, plain)
    head(q, row_scale, out, argmax)
    assert _same_bits(out, plain)
    assert argmax.tolist() == plain.argmax(axis=1).tolist() and argmax[0] == 0
    nan_row = rows // 2
    row_scale[nan_row] = np.nan
    head(q, row_scale, out, argmax)
    assert argmax[nan_row] == -1
    assert all(argmax[i] == out[i].argmax() for i in range(rows) if i != nan_row)


def test_shapes_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        Int8Head(np.zeros((6, 16), np.int8), np.ones(16, np.float32), 1)
    if KERNEL_HERE:
        head = Int8Head(np.zeros((8, 16), np.int8), np.ones(16, np.float32), 1)
        with pytest.raises(ValueError, match="LM head shapes"):
            head(np.zeros((2, 8), np.uint8), np.ones((2, 1), np.float32), np.empty((3, 16), np.float32))
        rows = native_head.MAX_ARGMAX_ROWS + 1
        with pytest.raises(ValueError, match="argmax"):
            head(np.zeros((rows, 8), np.uint8), np.ones((rows, 1), np.float32), np.empty((rows, 16), np.float32),
                 np.empty(rows, np.int32))
        with pytest.raises(ValueError, match="argmax"):
            head(np.zeros((2, 8), np.uint8), np.ones((2, 1), np.float32), np.empty((2, 16), np.float32), np.empty(2, np.int64))


def _runner_logits(engine_dir: Path, native: bool, monkeypatch, own_outputs: bool = True) -> tuple[object, list[np.ndarray]]:
    """Chunked prefill of three prompts, 6 batched decode steps, one 3-token verify: every logits array.
    ``own_outputs`` False: the head's inputs come back through onnxruntime's ``get_outputs`` (the path for a
    graph whose head input shape is not known before the run) instead of arrays the runner binds."""
    from toolkit.export.golden import Reference
    from toolkit.runtime.gqa_runner import GqaModelRunner

    monkeypatch.setenv(native_head.ENV_SWITCH, "1" if native else "0")
    runner = GqaModelRunner(engine_dir / "model.onnx", threads=2, verify=True)
    if runner.head is not None:
        assert runner._head_input_shape_known
        runner._head_input_shape_known = own_outputs
    cases = Reference.load(engine_dir).cases[:3]
    seen, last = [], []
    batch = runner.new_batch()
    for case in cases:
        ids = case.prompt_ids
        first, past = runner.prefill(ids[:4], None, 0)
        logits, past = runner.prefill(ids[4:], past, 4)
        seen += [first, logits]
        batch.add_rows(past, [len(ids)])
        last.append(int(logits.argmax()))
    batch.reserve(batch.size, max(batch.lengths) + 12)
    for _ in range(6):
        logits = runner.decode(batch, last, list(batch.lengths)).copy()
        seen.append(logits)
        last = [int(row.argmax()) for row in logits]
        # the kernel's argmax of what it returned; none where the head ran in the graph
        assert (runner.argmax is None) == (runner.head is None)
        assert runner.argmax is None or runner.argmax.tolist() == last
    single = runner.new_batch()
    _, past = runner.prefill(cases[0].prompt_ids, None, 0)
    single.add_rows(past, [len(cases[0].prompt_ids)])
    single.reserve(1, single.lengths[0] + 4)
    seen.append(runner.verify(single, [[last[0], 5, 7]], list(single.lengths)).copy())
    return runner, seen


def test_runner_logits_are_the_graphs_bitwise(tiny_engine, monkeypatch):
    """The tiny int8 gqa engine (per-row int8 LM head): prefill, batched decode and a verify run give the
    same bits with the head in the graph and on the kernel; the edited graph returns no ``logits``."""
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "int8", "gqa")
    graph_runner, expected = _runner_logits(engine_dir, False, monkeypatch)
    assert graph_runner.head is None and "logits" in {o.name for o in graph_runner.session.get_outputs()}
    runner, got = _runner_logits(engine_dir, True, monkeypatch)
    if not KERNEL_HERE:
        assert runner.head is None
        return
    outputs = {o.name for o in runner.session.get_outputs()}
    assert runner.head is not None and "logits" not in outputs
    assert {runner.head.q_output, runner.head.scale_output} <= outputs
    assert runner.vocab == graph_runner.vocab
    assert len(got) == len(expected) and all(_same_bits(a, b) for a, b in zip(got, expected))
    _, fetched = _runner_logits(engine_dir, True, monkeypatch, own_outputs=False)
    assert all(_same_bits(a, b) for a, b in zip(fetched, expected))


def test_a_chunk_without_logits_skips_the_kernel_head_and_changes_nothing_else(tiny_engine, monkeypatch):
    """``prefill(logits=False)`` (a prompt chunk before the last, ``OnnxEngine._run_prefill``): None in
    place of the logits, no kernel call where the head is ours, and the next chunk's logits and the
    cache bitwise what a chunk with logits leaves."""
    from toolkit.export.golden import Reference
    from toolkit.runtime.gqa_runner import GqaModelRunner

    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "int8", "gqa")
    runner = GqaModelRunner(engine_dir / "model.onnx", threads=2)
    calls = []
    if runner.head is not None:
        kernel = runner.head.head

        class Counting:
            def __getattr__(self, name):
                return getattr(kernel, name)

            def __call__(self, *args):
                calls.append(args[0].shape)
                return kernel(*args)

        object.__setattr__(runner.head, "head", Counting())
    ids = Reference.load(engine_dir).cases[0].prompt_ids
    _, past = runner.prefill(ids[:5], None, 0)
    with_logits, past = runner.prefill(ids[5:], past, 5)
    cache = {name: array[:, :, :len(ids)].copy() for name, array in past.items()}
    calls.clear()
    skipped, past = runner.prefill(ids[:5], None, 0, logits=False)
    assert skipped is None and calls == []
    again, past = runner.prefill(ids[5:], past, 5)
    assert len(calls) == (1 if KERNEL_HERE else 0) and (runner.head is not None) == KERNEL_HERE
    assert _same_bits(again, with_logits)
    assert all(np.array_equal(past[name][:, :, :len(ids)], cache[name]) for name in cache)


def test_heads_of_other_schemes_stay_in_the_graph(tiny_engine):
    """An fp32 graph's head (a MatMul) is not the kernel's: the model is left as it was."""
    import onnx

    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32", "gqa")
    model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    before = model.SerializeToString()
    assert split_lm_head(model, engine_dir, 1) is None
    assert model.SerializeToString() == before


def test_switched_off_or_on_a_cpu_without_vnni_the_head_stays_in_the_graph(tmp_path, monkeypatch):
    weight, col_scale = np.ones((8, 32), np.int8), np.ones(32, np.float32)
    monkeypatch.setenv(native_head.ENV_SWITCH, "0")
    model = reference_model(weight, col_scale)
    before = model.SerializeToString()
    assert split_lm_head(model, tmp_path, 1) is None and model.SerializeToString() == before
    monkeypatch.delenv(native_head.ENV_SWITCH)
    monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert split_lm_head(model, tmp_path, 1) is None and model.SerializeToString() == before
