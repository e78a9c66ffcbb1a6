"""TensorRT-LLM engine builder: exact API calls against a fake ``tensorrt_llm``, plus a real GPU build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fake_trtllm import FakeQuantAlgo, FakeTrtLlm
from gpu_check import trtllm_gpu_skip_reason

from toolkit.artifact.trtllm import TRTLLM_MISSING_MESSAGE, TrtLlmUnavailableError
from toolkit.export import trtllm_export
from toolkit.export.trtllm_export import build_trtllm_engine, trtllm_build_plan, trtllm_versions
from toolkit.recipes import all_recipes, get_recipe

PRECISIONS = ("fp16", "int8")
# Set by hand from recipes/codellama-70b-instruct.toml, not read from the recipe, so a changed
# recipe or a plan that ignores it fails here.
EXPECTED_TP = {("codellama-70b-instruct", "fp16"): 8, ("codellama-70b-instruct", "int8"): 4}
# Set by hand: the Gemma family builds bfloat16 (TensorRT-LLM's Gemma examples; Gemma 3 is unstable in
# float16), the others follow the checkpoint's torch_dtype (float16 when, as here, there is no config.json).
EXPECTED_DTYPE = {"default": "bfloat16", "gemma-7b-it": "bfloat16", "codegemma-7b-it": "bfloat16"}


def _cases():
    return [pytest.param(r, p, id=f"{r.name}-{p}") for r in all_recipes() for p in PRECISIONS]


@pytest.mark.parametrize(("recipe", "precision"), _cases())
def test_build_makes_exact_trtllm_calls(fake_trtllm: FakeTrtLlm, tmp_path: Path, recipe, precision: str) -> None:
    assert precision in recipe.trtllm.precisions
    checkpoint, out_dir = tmp_path / "ckpt", tmp_path / "stage"
    plan = build_trtllm_engine(checkpoint, recipe, precision, out_dir)

    tp = EXPECTED_TP.get((recipe.name, precision), 1)
    build_kwargs = {
        "max_batch_size": recipe.trtllm.max_batch_size,
        "max_num_tokens": recipe.trtllm.max_num_tokens,
        "max_seq_len": recipe.context_window,
        "max_input_len": recipe.context_window - 1,
    }
    assert [b.kwargs for b in fake_trtllm.build_configs] == [build_kwargs]
    # paged context FMHA set on the BuildConfig's PluginConfig: chunked prefill and KV reuse need it
    assert fake_trtllm.build_configs[0].plugin_config.use_paged_context_fmha is True
    if precision == "int8":
        assert [q.kwargs for q in fake_trtllm.quant_configs] == [{"quant_algo": FakeQuantAlgo.W8A16}]
    else:
        assert fake_trtllm.quant_configs == []

    [llm] = fake_trtllm.llms
    expected_llm = {
        "model": str(checkpoint),
        "dtype": EXPECTED_DTYPE.get(recipe.name, "float16"),
        "tensor_parallel_size": tp,
        "build_config": fake_trtllm.build_configs[0],
    }
    if precision == "int8":
        expected_llm["quant_config"] = fake_trtllm.quant_configs[0]
    assert llm.kwargs == expected_llm
    assert llm.saved == [str(out_dir)]
    assert llm.shutdowns == 1

    assert plan == {
        "backend": "tensorrt",
        "dtype": EXPECTED_DTYPE.get(recipe.name, "float16"),
        "tensor_parallel_size": tp,
        "build_config": {**build_kwargs, "plugin_config": {"use_paged_context_fmha": True}},
        "quant_algo": "W8A16" if precision == "int8" else None,
        "enable_chunked_prefill": True,
        "logprobs": False,
        "max_attention_window": None,
    }
    json.dumps(plan)  # recorded in the manifest as export options


def test_codellama_70b_is_tensor_parallel() -> None:
    [recipe] = [r for r in all_recipes() if r.name == "codellama-70b-instruct"]
    assert trtllm_build_plan(recipe, "fp16")["tensor_parallel_size"] == 8
    assert trtllm_build_plan(recipe, "int8")["tensor_parallel_size"] == 4


def test_shutdown_runs_when_save_fails(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    def broken_save(self, engine_dir):
        raise OSError("disk full")

    fake_trtllm.LLM.save = broken_save
    with pytest.raises(OSError, match="disk full"):
        build_trtllm_engine(tmp_path / "ckpt", all_recipes()[0], "fp16", tmp_path / "out")
    assert fake_trtllm.llms[0].shutdowns == 1


def test_llm_without_shutdown_is_tolerated(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    del fake_trtllm.LLM.shutdown
    build_trtllm_engine(tmp_path / "ckpt", all_recipes()[0], "int8", tmp_path / "out")
    assert fake_trtllm.llms[0].saved == [str(tmp_path / "out")]


def test_missing_tensorrt_llm_raises_clear_error(no_trtllm: None, tmp_path: Path) -> None:
    with pytest.raises(TrtLlmUnavailableError) as info:
        build_trtllm_engine(tmp_path / "ckpt", all_recipes()[0], "fp16", tmp_path / "out")
    assert str(info.value) == TRTLLM_MISSING_MESSAGE
    assert isinstance(info.value.__cause__, ImportError)
    assert "pip install" in TRTLLM_MISSING_MESSAGE and "1.2" in TRTLLM_MISSING_MESSAGE
    assert "onnx" in TRTLLM_MISSING_MESSAGE.lower()
    with pytest.raises(TrtLlmUnavailableError):
        trtllm_versions()


def test_missing_cuda_library_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("tensorrt_llm"):
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(TrtLlmUnavailableError, match="not importable"):
        trtllm_export.import_tensorrt_llm()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int4", ""])
def test_unsupported_precision_raises_value_error(fake_trtllm: FakeTrtLlm, tmp_path: Path, precision: str) -> None:
    recipe = all_recipes()[0]
    with pytest.raises(ValueError, match="fp16, int8"):
        build_trtllm_engine(tmp_path / "ckpt", recipe, precision, tmp_path / "out")
    with pytest.raises(ValueError, match=repr(precision)):
        trtllm_build_plan(recipe, precision)
    assert fake_trtllm.llms == []


def test_fp32_raises_value_error_even_without_tensorrt_llm(no_trtllm: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16, int8"):
        build_trtllm_engine(tmp_path / "ckpt", all_recipes()[0], "fp32", tmp_path / "out")


def test_versions_for_manifest(fake_trtllm: FakeTrtLlm) -> None:
    assert trtllm_versions()["tensorrt_llm"] == "1.2.1"


# --- real build on a GPU machine ---------------------------------------------------------------


def _write_tiny_llama(directory: Path) -> None:
    """A random 2-layer, hidden-64 Llama checkpoint with a tiny word-level tokenizer.

    One 64-wide attention head: TensorRT-LLM's attention kernels do not cover head size 16.
    Vocabulary and intermediate sizes are multiples of 64 for the int8 weight-only GEMMs.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, torch_dtype="float16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory, safe_serialization=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_builds_real_engine_from_tiny_llama(tmp_path: Path, precision: str) -> None:
    reason = trtllm_gpu_skip_reason()
    if reason is not None:
        pytest.skip(f"needs TensorRT-LLM 1.2.x and an NVIDIA GPU: {reason}")
    base = next(r for r in all_recipes() if r.architecture == "llama")
    trtllm = dataclasses.replace(
        base.trtllm, tensor_parallel_size={"fp16": 1, "int8": 1}, max_batch_size=2, max_num_tokens=256
    )
    recipe = dataclasses.replace(base, name="tiny-llama", context_window=256, trtllm=trtllm)
    checkpoint, out_dir = tmp_path / "ckpt", tmp_path / "engine"
    checkpoint.mkdir()
    out_dir.mkdir()
    _write_tiny_llama(checkpoint)

    plan = build_trtllm_engine(checkpoint, recipe, precision, out_dir)

    assert (out_dir / "rank0.engine").stat().st_size > 0
    engine_config = json.loads((out_dir / "config.json").read_text())
    build = engine_config["build_config"]
    assert (build["max_batch_size"], build["max_seq_len"], build["max_input_len"]) == (2, 256, 255)
    quant_algo = engine_config["pretrained_config"]["quantization"]["quant_algo"]
    assert quant_algo == plan["quant_algo"] == ("W8A16" if precision == "int8" else None)


GEMMA3_CONFIG = {"model_type": "gemma3_text", "torch_dtype": "bfloat16", "num_hidden_layers": 18, "sliding_window": 512,
                 "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}


def test_dtype_follows_the_checkpoint_unless_the_recipe_fixes_it(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    recipes = {r.name: r for r in all_recipes()}
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "num_hidden_layers": 2}))
    assert build_trtllm_engine(checkpoint, recipes["qwen2-7b-instruct"], "fp16", tmp_path / "a")["dtype"] == "bfloat16"
    (checkpoint / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert build_trtllm_engine(checkpoint, recipes["qwen2-7b-instruct"], "fp16", tmp_path / "b")["dtype"] == "float16"
    assert build_trtllm_engine(checkpoint, recipes["default"], "int8", tmp_path / "c")["dtype"] == "bfloat16"
    assert [llm.kwargs["dtype"] for llm in fake_trtllm.llms] == ["bfloat16", "float16", "bfloat16"]
    assert {r.trtllm.dtype for r in all_recipes() if r.chat_format == "gemma"} == {"bfloat16"}


def test_sliding_windows_and_logprobs_are_recorded_in_the_plan(fake_trtllm: FakeTrtLlm, tmp_path: Path) -> None:
    [default] = [r for r in all_recipes() if r.name == "default"]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(GEMMA3_CONFIG))
    plan = build_trtllm_engine(checkpoint, default, "int8", tmp_path / "out", logprobs=True)
    assert plan["max_attention_window"] == ([512] * 5 + [default.context_window]) * 3
    assert plan["logprobs"] is True and plan["enable_chunked_prefill"] is True
    assert trtllm_build_plan(default, "int8", GEMMA3_CONFIG)["logprobs"] is False
    json.dumps(plan)


def test_export_cli_has_logprobs_only_for_trtllm(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, ["export", "--target", "onnx", "--logprobs", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--logprobs is a TensorRT-LLM export option" in result.output
    assert "--logprobs" in CliRunner().invoke(main, ["export", "--help"]).output


def test_gpu_smoke_script_stops_with_one_sentence_without_tensorrt_llm(no_trtllm: None, tmp_path: Path, capsys) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "trtllm_smoke.py"
    spec = importlib.util.spec_from_file_location("trtllm_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--out", str(tmp_path / "smoke")]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and out.endswith(".") and "TensorRT-LLM 1.2.x is not importable" in out
    assert not (tmp_path / "smoke").exists()  # stopped before any work


def test_exported_engine_config_has_paged_context_fmha_so_chunked_prefill_and_reuse_start(fake_trtllm: FakeTrtLlm,
                                                                                          tmp_path: Path) -> None:
    """What the build writes is what the runtime checks: the saved config.json's plugin_config lets
    LLM(enable_chunked_prefill=True) start (the executor refuses it otherwise) with block reuse on."""
    recipe = get_recipe("qwen2-7b-instruct")
    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    build_trtllm_engine(tmp_path / "ckpt", recipe, "fp16", out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["build_config"]["plugin_config"]["use_paged_context_fmha"] is True
    llm = fake_trtllm.LLM(model=str(out_dir), enable_chunked_prefill=True)
    assert llm.block_reuse
