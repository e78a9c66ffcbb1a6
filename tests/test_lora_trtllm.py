"""LoRA on TensorRT-LLM (issue #12) against the fake ``tensorrt_llm`` built from the recorded 1.2 API:
the LoRA build options at export, ``export-lora`` onto a TensorRT-LLM engine directory (PEFT files +
validation through a ``LoRARequest``), and per-request ``LoRARequest``s in ``TrtLlmEngine``."""

from __future__ import annotations

import asyncio
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fake_trtllm import FakeTrtLlm
from lora_fixtures import make_peft_adapter

from toolkit.artifact.lora import AdapterError, AdapterInfo
from toolkit.artifact.manifest import Manifest, describe_files, load_manifest, write_manifest
from toolkit.cli import main as cli
from toolkit.export.lora import export_lora
from toolkit.export.trtllm_export import build_trtllm_engine, lora_build_options
from toolkit.recipes import get_recipe
from toolkit.runtime.engines.trtllm_engine import TrtLlmEngine
from toolkit.runtime.errors import InvalidRequestError
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest

GEMMA = get_recipe("gemma-7b-it")
QWEN = get_recipe("qwen2-7b-instruct")


# ---- export: the LoRA build options ----------------------------------------------------------------


def test_export_builds_the_lora_plugin_with_the_recorded_config(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    lora = lora_build_options(16, ("q_proj", "v_proj", "down_proj"), max_loras=4)
    plan = build_trtllm_engine(tmp_path / "ckpt", QWEN, "int8", tmp_path / "out", lora=lora)
    [llm] = fake_trtllm.llms
    assert llm.kwargs["enable_lora"] is True
    config = llm.kwargs["lora_config"]
    assert isinstance(config, fake_trtllm.LoraConfig)
    assert config.kwargs == {"max_lora_rank": 16, "lora_target_modules": ["attn_q", "attn_v", "mlp_4h_to_h"],
                             "max_loras": 4, "max_cpu_loras": 4}
    assert llm.kwargs["build_config"].lora_config is config  # the builder's use_lora reads the modules from it
    assert plan["lora"] == lora and json.loads(json.dumps(plan)) == plan  # recorded in the manifest as is


def test_export_without_lora_sets_no_lora_keyword(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    plan = build_trtllm_engine(tmp_path / "ckpt", QWEN, "fp16", tmp_path / "out")
    [llm] = fake_trtllm.llms
    assert "enable_lora" not in llm.kwargs and "lora_config" not in llm.kwargs
    assert "lora_config" not in llm.kwargs["build_config"].kwargs and "lora" not in plan


def test_lora_build_options_refuse_bad_values() -> None:
    for bad in (dict(rank=0), dict(rank=65), dict(rank=8, target_modules=("lm_head",)),
                dict(rank=8, max_loras=4, max_cpu_loras=2)):
        with pytest.raises(ValueError):
            lora_build_options(**bad)
    assert lora_build_options(8)["trtllm_target_modules"] == [
        "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"]


def test_export_cli_lora_options_are_trtllm_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "--lora-rank", "8", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--lora-rank is a TensorRT-LLM export option" in result.output
    result = CliRunner().invoke(cli, ["export", "--target", "trtllm", "--lora-target-modules", "q_proj"])
    assert result.exit_code == 2 and "need --lora-rank" in result.output
    result = CliRunner().invoke(cli, ["export", "--target", "trtllm", "--lora-rank", "8", "--lora-target-modules", "wq"])
    assert result.exit_code == 2 and "not supported" in result.output


# ---- export-lora onto a TensorRT-LLM engine directory ----------------------------------------------


@pytest.fixture(scope="module")
def peft_adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-trt")
    ckpt = tiny_checkpoint(GEMMA)
    return {"qv": make_peft_adapter(ckpt, root / "qv", seed=3, targets=("q_proj", "v_proj"), b_std=0.2),
            "all": make_peft_adapter(ckpt, root / "all", seed=4, rank=16)}


def _trt_engine(tiny_engine, tmp_path: Path, lora: dict | None) -> Path:
    """A TensorRT-LLM engine directory stand-in: the tiny model's reference, tokenizer and manifest, target trtllm."""
    source = tiny_engine(GEMMA, "fp32")
    engine = tmp_path / "trt-engine"
    engine.mkdir(parents=True)
    for name in ("reference.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, engine / name)
    (engine / "config.json").write_text(json.dumps({"build_config": {"max_seq_len": 256, "max_input_len": 255},
                                                    "pretrained_config": {}}))
    base = load_manifest(source)
    manifest = Manifest(recipe=base.recipe, source=base.source, architecture=base.architecture, target="trtllm",
                        precision="fp16", context_length=base.context_length, kv_layout={}, build_key="test",
                        tokenizer_files=base.tokenizer_files, export_options={"lora": lora, "enable_chunked_prefill": True})
    manifest.files = describe_files(engine)
    write_manifest(engine, manifest)
    return engine


def _peft_generate(checkpoint: Path, calls: list):
    """``LLM.generate`` computed by PyTorch (+ PEFT when a LoRARequest names an adapter directory)."""
    import torch
    from peft import PeftModel

    from toolkit.export.pytorch_check import load_pytorch_model

    models: dict = {}

    def model_for(path: str | None):
        if path not in models:
            base = load_pytorch_model(checkpoint)
            models[path] = (PeftModel.from_pretrained(base, path) if path else base).eval()
        return models[path]

    def run(model, ids: list[int], steps: int):
        tokens, rows = [], []
        with torch.inference_mode():
            for _ in range(steps):
                rows.append(model(input_ids=torch.tensor([list(ids) + tokens])).logits[0, -1].float().numpy())
                tokens.append(int(rows[-1].argmax()))
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens, generation_logits=np.stack(rows))])

    def generate(self, inputs, sampling_params=None, use_tqdm=True, lora_request=None):
        calls.append(lora_request)
        batched = bool(inputs) and isinstance(inputs[0], list)
        requests = lora_request if batched else [lora_request]
        results = []
        for ids, request in zip(inputs if batched else [inputs], requests):
            if request is not None:
                assert type(request).__name__ == "LoRARequest" and Path(request.lora_path).is_dir()
            results.append(run(model_for(request.lora_path if request else None), ids, sampling_params.kwargs["max_tokens"]))
        return results if batched else results[0]

    return generate


def test_export_lora_onto_a_trtllm_engine_validates_through_a_lora_request(
        fake_trtllm: FakeTrtLlm, tiny_engine, tiny_checkpoint, peft_adapters, tmp_path: Path) -> None:
    engine = _trt_engine(tiny_engine, tmp_path, lora_build_options(16, None, 4))
    calls: list = []
    fake_trtllm.LLM.generate = _peft_generate(tiny_checkpoint(GEMMA), calls)
    outcome = export_lora(peft_adapters["qv"], engine, "qv")
    result = outcome.info.validation
    assert result["passed"], result["failures"]
    assert result["greedy_agreement"] == 1.0 and result["top1_agreement"] == 1.0
    # every validation request carried the adapter, pointing at the published-to-be PEFT files
    assert calls and all(c is not None for c in calls)
    flat = [r for c in calls for r in (c if isinstance(c, list) else [c])]
    assert {(r.lora_name, r.lora_int_id) for r in flat} == {("qv", 1)}
    [llm] = fake_trtllm.llms
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["lora_config"].max_lora_rank == 16 and llm.shutdowns == 1
    # the adapter dir is the PEFT directory itself (TensorRT-LLM loads it) + our record and reference
    names = {p.name for p in outcome.adapter_dir.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "adapter.json", "reference.json"}
    info = AdapterInfo.load(outcome.adapter_dir)
    assert info.target_modules == ["q_proj", "v_proj"] and info.rank == 8 and info.source["format"] == "hf-peft"
    manifest = load_manifest(engine)  # hash-checked, the adapter files included
    assert manifest.adapters["qv"]["validation"]["passed"]
    assert "adapters/qv/adapter_model.safetensors" in manifest.files


def test_export_lora_refuses_an_engine_without_lora_or_an_adapter_that_does_not_fit(
        fake_trtllm: FakeTrtLlm, tiny_engine, peft_adapters, tmp_path: Path) -> None:
    engine = _trt_engine(tiny_engine, tmp_path / "a", None)
    with pytest.raises(AdapterError, match="built without LoRA.*--lora-rank"):
        export_lora(peft_adapters["qv"], engine, "qv")
    small = _trt_engine(tiny_engine, tmp_path / "b", lora_build_options(8, ("q_proj", "k_proj", "v_proj")))
    with pytest.raises(AdapterError, match="rank 16, above the engine's max LoRA rank 8"):
        export_lora(peft_adapters["all"], small, "all")
    narrow = _trt_engine(tiny_engine, tmp_path / "c", lora_build_options(32, ("q_proj", "k_proj", "v_proj")))
    with pytest.raises(AdapterError, match="targets down_proj, gate_proj, o_proj, up_proj"):
        export_lora(peft_adapters["all"], narrow, "all")
    assert not fake_trtllm.llms and not (narrow / "adapters").exists()  # refused before any engine work


# ---- serving: LoRARequest per request ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tiny_models import build_tokenizer

    directory = tmp_path_factory.mktemp("trt-lora-tokenizer")
    build_tokenizer("chatml").save_pretrained(directory)
    return directory


def _exported_adapter(directory: Path, name: str, rank: int, targets: list[str], base_sha: str) -> Path:
    """An adapter directory as export-lora leaves it for a TensorRT-LLM engine (PEFT files + adapter.json)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": targets}))
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    AdapterInfo(name=name, rank=rank, lora_alpha=16.0, use_rslora=False, target_modules=sorted(targets), modules={},
                base_model="", base_sha256=base_sha, architecture="qwen2", weights_sha256="").save(directory)
    return directory


def _serving_engine(tmp_path: Path, tokenizer_dir: Path, lora: dict | None, adapters=None, **kwargs) -> TrtLlmEngine:
    engine_dir = tmp_path / "engine"
    shutil.copytree(tokenizer_dir, engine_dir)
    (engine_dir / "config.json").write_text(json.dumps({
        "build_config": {"max_seq_len": 96, "max_input_len": 95, "max_batch_size": 8, "max_num_tokens": 8192},
        "pretrained_config": {"vocab_size": 400}}))
    manifest = Manifest(recipe=QWEN.name, source={"sha256": "base-sha"}, architecture="qwen2", target="trtllm",
                        precision="int8", context_length=96, kv_layout={}, build_key="test",
                        export_options={"lora": lora})
    return TrtLlmEngine(engine_dir, manifest, QWEN, adapters=adapters, **kwargs)


def _request(adapter: str | None) -> GenerateRequest:
    return GenerateRequest((5, 6, 7), SamplingParams(max_tokens=4, temperature=0), adapter=adapter)


async def _drain(engine: TrtLlmEngine, request: GenerateRequest) -> list:
    return [o async for o in await engine.generate(request)]


def test_each_request_carries_its_adapters_lora_request_with_a_stable_id(
        fake_trtllm: FakeTrtLlm, tmp_path: Path, tokenizer_dir: Path) -> None:
    fake_trtllm.invent_tokens = True
    adapters = {name: _exported_adapter(tmp_path / "adapters" / name, name, 8, targets, "base-sha")
                for name, targets in (("sql", ["q_proj", "v_proj"]), ("bot", ["q_proj", "k_proj", "v_proj", "o_proj"]))}
    engine = _serving_engine(tmp_path, tokenizer_dir, lora_build_options(8, None, 2, 6), adapters, max_loras=3)
    assert set(engine.adapter_names) == {"sql", "bot"}

    async def scenario():
        await engine.start()
        try:
            order = ["sql", None, "bot", "sql", None, "bot"]
            outputs = await asyncio.gather(*(_drain(engine, _request(a)) for a in order))
            return order, outputs
        finally:
            await engine.stop()

    order, outputs = asyncio.run(scenario())
    assert all(o[-1].choices[-1].finish_reason == "length" for o in outputs)
    [llm] = fake_trtllm.llms
    config = llm.kwargs["lora_config"]
    assert llm.kwargs["enable_lora"] is True and config.kwargs == {
        "max_lora_rank": 8, "lora_target_modules": ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h",
                                                    "mlp_gate", "mlp_4h_to_h"], "max_loras": 3, "max_cpu_loras": 6}
    sent = llm.lora_requests
    assert len(sent) == len(order)
    assert [r.lora_name if r else None for r in sent] == order  # a base request carries none
    ids = {(r.lora_name, r.lora_int_id, r.lora_path) for r in sent if r}
    assert ids == {("bot", 1, str(adapters["bot"].resolve())), ("sql", 2, str(adapters["sql"].resolve()))}
    assert len({id(r) for r in sent if r and r.lora_name == "sql"}) == 1  # one LoRARequest per adapter, reused


def test_engine_without_lora_refuses_adapters_with_a_clear_400(
        fake_trtllm: FakeTrtLlm, tmp_path: Path, tokenizer_dir: Path) -> None:
    fake_trtllm.invent_tokens = True
    engine = _serving_engine(tmp_path, tokenizer_dir, None)

    async def scenario():
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="exported without LoRA.*--lora-rank") as info:
                await engine.generate(_request("sql"))
            assert info.value.status == 400 and info.value.param == "lora"
            return await _drain(engine, _request(None))  # the base model still serves
        finally:
            await engine.stop()

    assert asyncio.run(scenario())
    [llm] = fake_trtllm.llms
    assert "enable_lora" not in llm.kwargs and llm.lora_requests == [None]
    with pytest.raises(AdapterError, match="built without LoRA"):
        _serving_engine(tmp_path / "other", tokenizer_dir, None,
                        {"sql": _exported_adapter(tmp_path / "sql", "sql", 8, ["q_proj"], "base-sha")})


def test_unknown_or_mismatched_adapters_are_refused(fake_trtllm: FakeTrtLlm, tmp_path: Path, tokenizer_dir: Path) -> None:
    fake_trtllm.invent_tokens = True
    lora = lora_build_options(8, ("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match="another base checkpoint"):
        _serving_engine(tmp_path / "a", tokenizer_dir, lora, {"x": _exported_adapter(tmp_path / "x", "x", 8, ["q_proj"], "other")})
    with pytest.raises(AdapterError, match="does not fit"):
        _serving_engine(tmp_path / "b", tokenizer_dir, lora, {"y": _exported_adapter(tmp_path / "y", "y", 8, ["o_proj"], "base-sha")})
    engine = _serving_engine(tmp_path / "c", tokenizer_dir, lora,
                             {"z": _exported_adapter(tmp_path / "z", "z", 4, ["q_proj"], "base-sha")})

    async def scenario():
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="no LoRA adapter 'nope' \\(served: z\\)"):
                await engine.generate(_request("nope"))
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_the_fake_refuses_a_lora_request_on_an_llm_without_lora(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    """The fake's own check (so the engine test above can fail): TensorRT-LLM without the LoRA plugin."""
    llm = fake_trtllm.LLM(model=str(tmp_path))
    request = fake_trtllm.LoRARequest(lora_name="a", lora_int_id=1, lora_path=str(tmp_path))
    with pytest.raises(ValueError, match="without the LoRA plugin"):
        llm.generate_async([1, 2], sampling_params=fake_trtllm.SamplingParams(max_tokens=2), lora_request=request)
    with pytest.raises(ValueError, match="does not exist"):
        fake_trtllm.LoRARequest(lora_name="a", lora_int_id=1, lora_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not TensorRT-LLM LoRA modules"):
        fake_trtllm.LoraConfig(lora_target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'swap_gate_up_proj'"):
        fake_trtllm.LoraConfig(swap_gate_up_proj=True)


def test_serve_lora_hands_a_trtllm_engine_its_exported_adapters(fake_trtllm: FakeTrtLlm, tmp_path: Path,
                                                                  tokenizer_dir: Path) -> None:
    """``toolkit serve ENGINE --lora sql --max-loras 2`` on a TensorRT-LLM engine with LoRA (load_engines)."""
    from toolkit.server.serve import load_engines

    engine = _serving_engine(tmp_path, tokenizer_dir, lora_build_options(8, None, 2, 6))
    adapter = _exported_adapter(engine.engine_dir / "adapters" / "sql", "sql", 8, ["q_proj", "v_proj"], "base-sha")
    manifest = engine.manifest
    manifest.adapters["sql"] = {"path": "adapters/sql", "rank": 8, "target_modules": ["q_proj", "v_proj"]}
    manifest.files = describe_files(engine.engine_dir)
    write_manifest(engine.engine_dir, manifest)
    [served] = load_engines([engine.engine_dir], loras=["sql"], max_loras=2).values()
    assert isinstance(served, TrtLlmEngine)
    assert served.adapter_names == ("sql",) and served.max_loras == 2
    assert Path(served.adapter_sources["sql"]).resolve() == adapter.resolve()
