"""The ``--graph gqa`` path: onnxruntime-genai's GroupQueryAttention graph over a preallocated, shared KV buffer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.export.gqa_export import GraphBuildError, builder_command
from toolkit.artifact import native_attention
from toolkit.artifact.manifest import load_manifest
from toolkit.recipes import get_recipe
from toolkit.runtime.kv_cache import KVCacheManager, KvGeometry
from toolkit.runtime.shared_kv import SharedKV

NAMES = ["past_key_values.0.key", "past_key_values.0.value"]


def _row(value: float, length: int, heads: int = 1, dim: int = 4) -> dict[str, np.ndarray]:
    return {name: np.full((1, heads, length, dim), value, np.float32) for name in NAMES}


# ---- SharedKV: the slot buffers ------------------------------------------------------------------
def test_rows_are_copied_once_into_slots_and_steps_use_views():
    kv = SharedKV(NAMES, 1, 4, np.float32, max_length=1024)
    kv.add_rows(_row(1.0, 5), [5])
    kv.add_rows(_row(2.0, 3), [3, 3])  # n = 2 sequences sharing one prefill
    assert kv.lengths == [5, 3, 3]
    buffers, mask = kv.step_views()
    for name in NAMES:
        assert np.shares_memory(buffers[name], kv.buffers[name])
        assert buffers[name].shape[0] == 3 and buffers[name].flags.c_contiguous
        assert (kv.buffers[name][0, :, :5] == 1).all() and (kv.buffers[name][1:3, :, :3] == 2).all()
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    before = {name: kv.buffers[name].__array_interface__["data"][0] for name in NAMES}
    reallocations = kv.reallocations
    for _ in range(20):  # steps within capacity allocate and copy nothing
        kv.step_views()
        kv.accept_step()
    assert kv.reallocations == reallocations
    assert {name: kv.buffers[name].__array_interface__["data"][0] for name in NAMES} == before
    assert kv.lengths == [25, 23, 23]


def test_leaving_rows_are_refilled_from_the_end_and_order_is_reported():
    kv = SharedKV(NAMES, 1, 4, np.float32, max_length=1024)
    for value, length in ((10, 4), (11, 5), (12, 6), (13, 7), (14, 8)):
        kv.add_rows(_row(value, length), [length])
    order = kv.keep_rows([0, 2, 4])  # rows 1 and 3 leave: row 4 moves into slot 1
    assert order == [0, 4, 2]
    assert kv.lengths == [4, 8, 6]
    key = kv.buffers[NAMES[0]]
    assert (key[1, :, :8] == 14).all() and (key[2, :, :6] == 12).all() and (key[0, :, :4] == 10).all()
    assert kv.keep_rows([]) == [] and kv.size == 0


def test_growth_keeps_every_live_row_and_refuses_beyond_max_length():
    kv = SharedKV(NAMES, 2, 4, np.float32, max_length=200)
    kv.add_rows(_row(3.0, 60, heads=2), [60])
    first_capacity = kv.capacity
    for _ in range(first_capacity - 60):
        kv.step_views()
        kv.accept_step()
    kv.step_views()  # one more token than the capacity holds: reallocate once, keep the data
    assert kv.capacity > first_capacity and kv.capacity <= 200
    assert (kv.buffers[NAMES[1]][0, :, :60] == 3).all()
    with pytest.raises(ValueError, match="200-token"):
        kv.add_rows(_row(1.0, 250, heads=2), [250])


def test_capacity_follows_the_longest_live_row():
    """GroupQueryAttention's cost grows with the buffer's capacity, so it tracks the longest row both ways."""
    kv = SharedKV(NAMES, 1, 4, np.float32, max_length=4096)
    kv.add_rows(_row(1.0, 1000), [1000])
    kv.add_rows(_row(2.0, 10), [10])
    kv.step_views()
    assert kv.capacity == 1024
    assert kv.keep_rows([1]) == [1]  # the long row leaves
    kv.step_views()
    assert kv.capacity == 64 and (kv.buffers[NAMES[0]][0, :, :10] == 2).all()


def test_rectangular_cache_accounting_counts_rows_times_longest():
    geometry = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    budget = geometry.bytes_per_token * 16 * 10  # ten blocks of 16 tokens
    flat, rectangular = KVCacheManager(geometry, budget), KVCacheManager(geometry, budget, rectangular=True)
    for manager in (flat, rectangular):
        manager.allocate("long", 16 * 4)
        manager.allocate("short", 16)
    assert flat.used_blocks == 5 and rectangular.used_blocks == 8
    assert flat.can_allocate(16, count=4) and not rectangular.can_allocate(16, count=1)
    rectangular.free("long")
    assert rectangular.used_blocks == 1 and rectangular.can_allocate(16 * 3, count=2)


# ---- export --------------------------------------------------------------------------------------
def test_builder_command_options_and_unsupported_precision(tmp_path):
    int8 = builder_command(tmp_path / "ckpt", "int8", tmp_path / "out", tmp_path / "cache")
    assert int8[1:3] == ["-m", "toolkit.export.gqa_builder_main"]
    assert {"prune_lm_head=true", "accuracy_level=4", "block_size=32", "op_types_to_quantize=MatMul"} <= set(int8)
    assert int8[int8.index("-p") + 1] == "int8" and int8[int8.index("-e") + 1] == "cpu"
    assert "accuracy_level=4" not in builder_command(tmp_path, "fp32", tmp_path, tmp_path)
    with pytest.raises(GraphBuildError, match="fp32, int8 only, not fp16"):
        builder_command(tmp_path, "fp16", tmp_path, tmp_path)


def test_builder_failure_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    from toolkit.export import gqa_export

    monkeypatch.setattr(gqa_export, "BUILDER_ENTRY", "toolkit.export.no_such_builder")
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(GraphBuildError, match=r"(?s)builder failed .exit 1.*No module named toolkit.export.no_such_builder"):
        gqa_export.build_gqa_model(tmp_path, "fp32", stage)
    assert list(stage.iterdir()) == []


def test_cli_refuses_fp16_gqa_before_any_work(tmp_path, tiny_checkpoint):
    checkpoint = tiny_checkpoint(get_recipe("qwen2-7b-instruct"))
    result = CliRunner().invoke(
        main, ["export", str(checkpoint), "--recipe", "qwen2-7b-instruct", "--graph", "gqa", "--precision", "fp16", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code != 0 and "fp32, int8 only, not fp16" in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_gqa_export_is_validated_and_described(precision, tiny_engine):
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), precision, "gqa")
    manifest = load_manifest(engine_dir)
    assert manifest.export_options["graph"] == "gqa" and manifest.export_options["builder"] == "onnxruntime-genai"
    assert "in place" in manifest.kv_layout["layout"]
    assert manifest.validation["passed"], manifest.validation["failures"]
    assert manifest.validation["top1_agreement"] >= (1.0 if precision == "fp32" else 0.93)
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= set(manifest.files)
    import onnx

    ops = {n.op_type for n in onnx.load(str(engine_dir / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and ("MatMulNBits" in ops) == (precision == "int8")


def test_gemma3_layers_follow_layer_types(tiny_engine, tiny_checkpoint):
    """The tiny Gemma 3 has layer_types [sliding, full]; the builder's default pattern would make both sliding."""
    import onnx

    recipe = get_recipe("default")
    layer_types = json.loads((tiny_checkpoint(recipe) / "config.json").read_text())["layer_types"]
    assert layer_types == ["sliding_attention", "full_attention"]
    graph = onnx.load(str(tiny_engine(recipe, "fp32", "gqa") / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size") for n in attention]
    assert windows == [16, -1]
    assert [n.input[7] for n in attention] == ["cos_cache_local", "cos_cache_global"]


# ---- the runner against the plain (copying) path ---------------------------------------------------
@pytest.mark.parametrize("recipe", ["gemma-7b-it", "default"])  # packed q/k/v; Gemma 3's q/k norms and 16-token window
def test_in_place_decode_matches_the_copying_reference_runner(tiny_engine, recipe):
    """Prefill one prompt in two chunks, decode 12 tokens in a batch of 2 over the shared buffer, and compare
    every logits row with the validation runner, which feeds the same graph a fresh past each step (and
    keeps onnxruntime's GroupQueryAttention where the runner has ours)."""
    from toolkit.export.golden import Reference
    from toolkit.export.ort_runner import OrtCausalLM
    from toolkit.runtime.gqa_runner import GqaModelRunner

    engine_dir = tiny_engine(get_recipe(recipe), "fp32", "gqa")
    cases = Reference.load(engine_dir).cases[:2]
    # the reference keeps onnxruntime's GroupQueryAttention; the runner takes ours where it can run
    runner = GqaModelRunner(engine_dir / "model.onnx", threads=1)
    reference = OrtCausalLM(engine_dir / "model.onnx", 1, native_attention=False)
    assert runner.native_attention == native_attention.available()
    batch = runner.new_batch()
    expected, last = [], []
    for case in cases:
        ids = case.prompt_ids
        _, past = runner.prefill(ids[:5], None, 0)
        logits, past = runner.prefill(ids[5:], past, 5)
        ref_logits, ref_past = reference.forward(ids, None)
        np.testing.assert_allclose(logits, ref_logits[-1], atol=1e-4)
        batch.add_rows(past, [len(ids)])
        expected.append((ref_logits[-1], ref_past))
        last.append(int(logits.argmax()))
    batch.reserve(batch.size, max(batch.lengths) + 13)  # room for every step below, allocated up front
    data = {name: buffer.__array_interface__["data"][0] for name, buffer in batch.buffers.items()}
    for _ in range(12):
        positions = list(batch.lengths)
        logits = runner.decode(batch, last, positions)
        for row, (_, ref_past) in enumerate(expected):
            ref_logits, ref_past = reference.forward([last[row]], ref_past)
            expected[row] = (ref_logits[-1], ref_past)
            np.testing.assert_allclose(logits[row], ref_logits[-1], atol=1e-4)
        last = [int(row.argmax()) for row in logits]
    assert {name: buffer.__array_interface__["data"][0] for name, buffer in batch.buffers.items()} == data
    assert batch.lengths == [len(c.prompt_ids) + 12 for c in cases]
