"""``toolkit export-lora``: PEFT adapters converted for the engine graph, validated against PyTorch + PEFT."""

from __future__ import annotations

import json

import pytest

from lora_fixtures import copy_engine, make_peft_adapter
from toolkit.artifact.lora import AdapterError, AdapterInfo
from toolkit.artifact.manifest import EngineDirError, load_manifest
from toolkit.export.lora import export_lora
from toolkit.recipes import get_recipe

GEMMA = get_recipe("gemma-7b-it")


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    ckpt = tiny_checkpoint(GEMMA)
    return {
        "all": make_peft_adapter(ckpt, root / "all", seed=1, rslora=True),
        "qv": make_peft_adapter(ckpt, root / "qv", seed=2, targets=("q_proj", "v_proj"), b_std=0.2),
    }


def _greedy(reference_path):
    return [case["greedy_ids"] for case in json.loads(reference_path.read_text())["cases"]]


@pytest.mark.parametrize("graph", ["optimum", "gqa"])
def test_fp32_engine_with_adapter_equals_pytorch_peft(tiny_engine, adapters, tmp_path, graph):
    engine = copy_engine(tiny_engine(GEMMA, "fp32", graph), tmp_path / "engine")
    outcome = export_lora(adapters["all"], engine, "support-bot")
    result = outcome.info.validation
    assert result["passed"], result["failures"]
    assert result["greedy_agreement"] == 1.0 and result["top1_agreement"] == 1.0  # token for token
    assert result["max_abs_diff"] <= 1e-3
    # the adapter changes the output: its PyTorch + PEFT reference differs from the base reference
    base, adapted = _greedy(engine / "reference.json"), _greedy(outcome.adapter_dir / "reference.json")
    assert sum(b != a for b, a in zip(base, adapted)) >= len(base) // 2
    manifest = load_manifest(engine)  # every file, the LoRA graph and adapter included, hash-checked
    entry = manifest.adapters["support-bot"]
    assert entry["validation"]["passed"] and entry["weights_sha256"] == outcome.info.weights_sha256
    assert {"model.lora.onnx", "adapters/support-bot/adapter.safetensors"} <= set(manifest.files)
    assert AdapterInfo.load(outcome.adapter_dir).modules  # the adapter's own record


def test_int8_engine_with_adapters_meets_int8_bars(tiny_engine, adapters, tmp_path):
    engine = copy_engine(tiny_engine(GEMMA, "int8"), tmp_path / "engine")
    for name in ("all", "qv"):
        result = export_lora(adapters[name], engine, name).info.validation
        assert result["passed"], result["failures"]
        assert result["precision"] == "int8" and result["top1_agreement"] >= 0.93
    assert set(load_manifest(engine).adapters) == {"all", "qv"}


def test_adapter_outside_the_engine_and_a_tampered_adapter_is_refused(tiny_engine, adapters, tmp_path):
    engine = copy_engine(tiny_engine(GEMMA, "fp32"), tmp_path / "engine")
    outcome = export_lora(adapters["qv"], engine, "sql", out=tmp_path / "sql-export")
    assert outcome.adapter_dir == tmp_path / "sql-export" and "sql" not in load_manifest(engine).adapters
    export_lora(adapters["qv"], engine, "inside")
    weights = engine / "adapters" / "inside" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineDirError, match="adapters/inside/adapter.safetensors"):
        load_manifest(engine)


def test_bad_adapters_are_refused_naming_the_problem(tiny_engine, tiny_checkpoint, adapters, tmp_path):
    import shutil

    engine = copy_engine(tiny_engine(GEMMA, "fp32"), tmp_path / "engine")
    missing = tmp_path / "missing"
    shutil.copytree(adapters["qv"], missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        export_lora(missing, engine, "x")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["qv"], corrupt)
    blob = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        export_lora(corrupt, engine, "x")

    qwen = make_peft_adapter(tiny_checkpoint(get_recipe("qwen2-7b-instruct")), tmp_path / "qwen", seed=3)
    with pytest.raises(AdapterError, match="wrong base model"):
        export_lora(qwen, engine, "x")

    reshaped = tmp_path / "reshaped"  # same names, other shapes, no base model recorded
    shutil.copytree(adapters["qv"], reshaped)
    config = json.loads((reshaped / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (reshaped / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(reshaped / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :32].copy()
    save_file(tensors, str(reshaped / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="wrong base model or wrong shapes"):
        export_lora(reshaped, engine, "x")

    dora = tmp_path / "dora"
    shutil.copytree(adapters["qv"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="use_dora"):
        export_lora(dora, engine, "x")

    with pytest.raises(AdapterError, match="adapter name"):
        export_lora(adapters["qv"], engine, "bad name/..")
    assert load_manifest(engine).adapters == {}  # nothing refused was recorded
