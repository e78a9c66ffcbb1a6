"""Export of tiny checkpoints of every recipe at every precision, manifest handling and the validator."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from toolkit.artifact import manifest as manifest_module
from toolkit.artifact.manifest import EngineDirError, describe_files, load_manifest, write_manifest
from toolkit.cli import main
from toolkit.export import pipeline
from toolkit.export.golden import GREEDY_TOKENS, GOLDEN_MESSAGES, Reference, long_prompt_target, sliding_window_of
from toolkit.export.pipeline import ExportRequest, ensure_default_engine, run_export
from toolkit.export.progress import StageReporter
from toolkit.export.sources import SourceError, default_engine_dir
from toolkit.recipes import Recipe, TargetNotSupportedError, all_recipes, get_recipe

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
    # the long prompt: past the checkpoint's sliding window, within the context, validated as its own row
    [long_case] = reference.long_cases
    config = json.loads((engine_dir / "config.json").read_text())
    assert reference.sliding_window == sliding_window_of(config)
    assert reference.long_prompt_target == long_prompt_target(manifest.context_length) == 409
    assert max(len(c.prompt_ids) for c in reference.cases) < len(long_case.prompt_ids) <= reference.long_prompt_target
    assert len(long_case.prompt_ids) > (reference.sliding_window or 0) and len(long_case.greedy_ids) == GREEDY_TOKENS
    [long_row] = manifest.validation["long_cases"]
    assert long_row["prompt_tokens"] == len(long_case.prompt_ids) and manifest.validation["long"]["top1_agreement"] >= 0.93
    if precision == "fp32":
        assert manifest.validation["greedy_identical"] == len(reference.cases)
        assert manifest.validation["long"]["greedy_identical"] == 1


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
    manifest = load_manifest(engine_dir, verify_hashes=False)
    manifest.files = describe_files(engine_dir)
    write_manifest(engine_dir, manifest)


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
    from toolkit.artifact.manifest import clean_leftovers

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


def test_export_hashes_every_file_once_and_writes_the_manifest_once(tmp_path, tiny_checkpoint, monkeypatch):
    recipe = get_recipe("gemma-7b-it")
    checkpoint = tiny_checkpoint(recipe)
    hashed: list[Path] = []
    writes: list[dict] = []
    real_hash, real_write = manifest_module.sha256_file, pipeline.write_manifest

    def counting_hash(path, *args, **kwargs):
        hashed.append(Path(path))
        return real_hash(path, *args, **kwargs)

    def counting_write(engine_dir, manifest):
        writes.append(json.loads(manifest.to_json()))
        return real_write(engine_dir, manifest)

    monkeypatch.setattr(manifest_module, "sha256_file", counting_hash)
    monkeypatch.setattr(pipeline, "write_manifest", counting_write)
    outcome = run_export(ExportRequest(recipe, "onnx", "fp32", tmp_path / "eng", checkpoint), StageReporter(quiet=True))
    artifact_files = Counter(p.relative_to(tmp_path).as_posix().split("/", 1)[1] for p in hashed if tmp_path in p.parents)
    assert artifact_files == Counter(set(outcome.manifest.files)), "every artifact file hashed exactly once"
    assert len(writes) == 1 and writes[0]["validation"]["passed"], "the manifest is written once, with its verdict"
    assert load_manifest(tmp_path / "eng").validation == outcome.manifest.validation


def test_export_defaults_come_from_the_recipe():
    gemma, default = get_recipe("gemma-7b-it"), get_recipe("default")
    trtllm = ExportRequest.resolve(gemma, "trtllm")
    assert (trtllm.precision, trtllm.graph) == ("int8", "optimum") and gemma.default_precision_for("trtllm") == "int8"
    assert trtllm.out_dir == default_engine_dir(gemma, "trtllm", "int8")
    onnx_default = ExportRequest.resolve(default, "onnx")
    assert (onnx_default.precision, onnx_default.graph) == (default.default_precision, default.default_graph) == ("int8", "gqa")
    assert onnx_default.out_dir == default_engine_dir(default, "onnx", "int8", "gqa")
    given = ExportRequest.resolve(default, "onnx", "fp32", "optimum", Path("out"), Path("ckpt"), True)
    assert given == ExportRequest(default, "onnx", "fp32", Path("out"), Path("ckpt"), True, "optimum")
    fp16_trt = dataclasses.replace(gemma, trtllm=dataclasses.replace(gemma.trtllm, default_precision="fp16"))
    assert ExportRequest.resolve(fp16_trt, "trtllm").precision == "fp16"


def test_default_engine_uses_the_recipes_defaults(monkeypatch, tmp_path):
    """``ensure_default_engine`` (``toolkit serve``/``generate`` without an engine) asks the recipe, not its own rule."""
    requests = []

    def fake_export(request, reporter):
        requests.append(request)
        return pipeline.ExportOutcome(request.out_dir, SimpleNamespace(validation={"passed": True}), reused=True)

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(pipeline, "run_export", fake_export)
    monkeypatch.setattr(Recipe, "default_precision_for", lambda self, target: "fp16")
    monkeypatch.setattr(Recipe, "default_graph_for", lambda self, target: "optimum")
    engine_dir = ensure_default_engine(StageReporter(quiet=True))
    [request] = requests
    assert (request.target, request.precision, request.graph) == ("onnx", "fp16", "optimum")
    assert engine_dir == request.out_dir == tmp_path / "engines" / "default-onnx-fp16"


def test_unsupported_target_is_its_own_error(tmp_path):
    request = ExportRequest(get_recipe("gemma-7b-it"), "trtllm", "fp32", tmp_path / "e", tmp_path / "missing")
    with pytest.raises(TargetNotSupportedError, match=r"does not support trtllm at fp32; it supports onnx \(fp32, fp16, int8\); trtllm \(fp16, int8\)"):
        run_export(request, StageReporter(quiet=True))
    result = CliRunner().invoke(main, ["export", "--recipe", "gemma-7b-it", "--target", "trtllm", "--precision", "fp32"])
    assert result.exit_code == 1 and "does not support trtllm at fp32" in result.output and "trtllm (fp16, int8)" in result.output
    assert "Traceback" not in result.output
