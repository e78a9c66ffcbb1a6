"""Export of tiny checkpoints of every recipe at every precision, manifest handling and the validator."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.export.golden import GREEDY_TOKENS, GOLDEN_MESSAGES, Reference
from toolkit.export.manifest import EngineDirError, load_manifest, write_manifest
from toolkit.export.pipeline import ExportRequest, run_export
from toolkit.export.progress import StageReporter
from toolkit.export.sources import SourceError
from toolkit.recipes import all_recipes, get_recipe

RECIPES = [r.name for r in all_recipes()]


def _graph_ops(engine_dir):
    model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    return model, {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tiny_export_validates(recipe_name, precision, tiny_engine):
    recipe = get_recipe(recipe_name)
    engine_dir = tiny_engine(recipe, precision)
    manifest = load_manifest(engine_dir)
    assert (manifest.recipe, manifest.target, manifest.precision) == (recipe.name, "onnx", precision)
    assert manifest.architecture == recipe.architecture
    assert manifest.validation["passed"], manifest.validation["failures"]
    assert manifest.validation["pytorch_check"]["argmax_agreement"] == 1.0
    assert "tokenizer.json" in manifest.tokenizer_files and (engine_dir / "tokenizer.json").is_file()
    assert set(manifest.files) >= {"model.onnx", "model.onnx_data", "reference.json", "tokenizer.json", "config.json"}
    reference = Reference.load(engine_dir)
    assert len(reference.cases) == len(GOLDEN_MESSAGES) >= 8
    assert all(len(case.greedy_ids) == GREEDY_TOKENS >= 32 for case in reference.cases)
    if precision == "fp32":
        assert manifest.validation["greedy_identical"] == len(reference.cases)


def test_int8_is_matmulnbits_8bit(tiny_engine):
    model, ops = _graph_ops(tiny_engine(get_recipe("qwen2-7b-instruct"), "int8"))
    assert "MatMulNBits" in ops
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]


def test_fp16_weights_are_half_and_io_float(tiny_engine):
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), "fp16")
    model = onnx.load(str(engine_dir / "model.onnx"))
    dtypes = {init.data_type for init in model.graph.initializer if len(init.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_reexport_reuses_then_force_rebuilds(tmp_path, tiny_checkpoint):
    recipe = get_recipe("gemma-7b-it")
    request = ExportRequest(recipe, "onnx", "fp32", tmp_path / "eng", tiny_checkpoint(recipe))
    first = run_export(request, StageReporter(quiet=True))
    stamp = (tmp_path / "eng" / "model.onnx").stat().st_mtime_ns
    again = run_export(request, StageReporter(quiet=True))
    assert not first.reused and again.reused
    assert (tmp_path / "eng" / "model.onnx").stat().st_mtime_ns == stamp
    request.force = True
    forced = run_export(request, StageReporter(quiet=True))
    assert not forced.reused and (tmp_path / "eng" / "model.onnx").stat().st_mtime_ns != stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging dirs left behind"


def test_wrong_architecture_is_refused(tmp_path, tiny_checkpoint):
    request = ExportRequest(get_recipe("qwen2-7b-instruct"), "onnx", "fp32", tmp_path / "e", tiny_checkpoint(get_recipe("gemma-7b-it")))
    with pytest.raises(SourceError, match="expects a 'qwen2' checkpoint"):
        run_export(request, StageReporter(quiet=True))


def _copy_engine(tiny_engine, tmp_path, precision="fp32"):
    src = tiny_engine(get_recipe("codellama-70b-instruct"), precision)
    dst = tmp_path / "engine"
    shutil.copytree(src, dst)
    return dst


def test_truncated_artifact_is_refused(tiny_engine, tmp_path):
    engine_dir = _copy_engine(tiny_engine, tmp_path)
    data = engine_dir / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(EngineDirError, match="corrupted: model.onnx_data"):
        load_manifest(engine_dir)
    result = CliRunner().invoke(main, ["validate", str(engine_dir)])
    assert result.exit_code == 1 and "corrupted" in result.output


def test_missing_manifest_and_flipped_bytes_are_refused(tiny_engine, tmp_path):
    engine_dir = _copy_engine(tiny_engine, tmp_path)
    data = bytearray((engine_dir / "model.onnx_data").read_bytes())
    data[1000] ^= 0xFF
    (engine_dir / "model.onnx_data").write_bytes(bytes(data))
    with pytest.raises(EngineDirError, match="SHA-256"):
        load_manifest(engine_dir)
    (engine_dir / "toolkit.json").unlink()
    with pytest.raises(EngineDirError, match="export did not finish"):
        load_manifest(engine_dir)
    (engine_dir / "toolkit.json").write_text("{not json")
    with pytest.raises(EngineDirError, match="corrupted"):
        load_manifest(engine_dir)


def _perturb_weights(engine_dir, scale):
    model = onnx.load(str(engine_dir / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            array = onnx.numpy_helper.to_array(init)
            noisy = array + rng.normal(0, scale * (np.abs(array).mean() + 1e-6), array.shape).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
    (engine_dir / "model.onnx_data").unlink()
    onnx.save_model(model, str(engine_dir / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    write_manifest(engine_dir, load_manifest(engine_dir, verify_hashes=False))


def test_validator_fails_on_perturbed_weights(tiny_engine, tmp_path):
    engine_dir = _copy_engine(tiny_engine, tmp_path)
    ok = CliRunner().invoke(main, ["validate", str(engine_dir)])
    assert ok.exit_code == 0, ok.output
    assert "PASSED" in ok.output
    _perturb_weights(engine_dir, scale=0.05)
    load_manifest(engine_dir)  # the files are consistent: only the numbers are wrong
    bad = CliRunner().invoke(main, ["validate", str(engine_dir)])
    assert bad.exit_code == 1, bad.output
    assert "FAILED" in bad.output
    stored = json.loads((engine_dir / "toolkit.json").read_text())["validation"]
    assert stored["passed"] is False and stored["failures"]


def test_unsupported_precision_message():
    result = CliRunner().invoke(main, ["export", "--recipe", "nope"])
    assert result.exit_code != 0 and "unknown recipe 'nope'" in result.output


def test_graph_surgery_applied_and_exact(tiny_engine):
    """The default recipe (one KV head) loses repeat_kv's Expand; logits are last-position only; fp32 still exact."""
    engine_dir = tiny_engine(get_recipe("default"), "fp32")
    model, ops = _graph_ops(engine_dir)
    assert "Expand" not in {n.op_type for n in model.graph.node if "self_attn" in n.name}
    assert any(n.name == "toolkit/keep_last_position" for n in model.graph.node)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1
    manifest = load_manifest(engine_dir)
    assert manifest.validation["pytorch_check"]["max_abs_diff"] < 1e-3
    qwen_model, _ = _graph_ops(tiny_engine(get_recipe("qwen2-7b-instruct"), "fp32"))
    assert any(n.op_type == "Expand" for n in qwen_model.graph.node), "GQA with 2 KV heads must keep repeat_kv"


def test_leftovers_of_killed_exports_are_cleaned(tmp_path):
    from toolkit.export.manifest import clean_leftovers

    out = tmp_path / "eng"
    dead = tmp_path / ".eng.partial-999999999-1"
    live = tmp_path / f".eng.partial-{__import__('os').getpid()}-2"
    old = tmp_path / ".eng.old-3"
    for d in (dead, live, old):
        d.mkdir()
    (old / "toolkit.json").write_text("{}")
    clean_leftovers(out)
    assert not dead.exists() and live.exists()
    assert (out / "toolkit.json").exists() and not old.exists()
