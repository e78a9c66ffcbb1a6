"""Recipes: names, aliases, context windows, prices, chat-format quirks; every recipe has a tiny model."""

from __future__ import annotations

import pytest

from tiny_models import build_tokenizer, tiny_config
from toolkit.recipes import TargetNotSupportedError, UnknownRecipeError, all_recipes, get_recipe
from toolkit.recipes.chat_format import ChatFormatError, render_chat

EXPECTED_CONTEXT = {
    "google/gemma-7b-it": 8192,
    "google/codegemma-7b-it": 8192,
    "Qwen/Qwen2-7B-Instruct": 32768,
    "codellama/CodeLlama-70b-Instruct-hf": 4096,
}


@pytest.mark.parametrize("recipe", all_recipes(), ids=lambda r: r.name)
def test_every_recipe_has_a_tiny_model(recipe):
    config = tiny_config(recipe.architecture, build_tokenizer(recipe.chat_format))
    assert config.model_type == recipe.architecture
    assert config.num_hidden_layers == 2 and config.hidden_size == 64


@pytest.mark.parametrize("recipe", all_recipes(), ids=lambda r: r.name)
def test_recipe_defaults_and_prices(recipe):
    assert recipe.defaults["workers_ai"] == {"temperature": 0.6, "max_tokens": 256}
    assert recipe.price_per_million_tokens["input"] > 0 and recipe.price_per_million_tokens["output"] > 0
    assert recipe.estimated_cost(1_000_000, 0) == pytest.approx(recipe.price_per_million_tokens["input"])


def test_context_windows_match_reference_pages():
    for hf_id, context in EXPECTED_CONTEXT.items():
        assert get_recipe(hf_id).context_window == context


def test_aliases_resolve():
    assert get_recipe("@hf/google/gemma-7b-it").hf_id == "google/gemma-7b-it"
    assert get_recipe("GOOGLE/CODEGEMMA-7B-IT").name == "codegemma-7b-it"
    assert get_recipe("default").embedded
    with pytest.raises(UnknownRecipeError, match="toolkit recipes"):
        get_recipe("../etc/passwd")


def test_codellama_tensor_parallel():
    trt = get_recipe("codellama/CodeLlama-70b-Instruct-hf").trtllm
    assert trt.tensor_parallel_size == {"fp16": 8, "int8": 4}


def test_gemma_folds_system_into_first_user_turn():
    text = render_chat(
        "gemma",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert "system" not in text


def test_codellama70b_format():
    text = render_chat("codellama70b", [{"role": "system", "content": "S"}, {"role": "user", "content": " Hi "}])
    assert text == "<s>Source: system\n\n S <step> Source: user\n\n Hi <step> Source: assistant\nDestination: user\n\n "


def test_chatml_adds_default_system():
    text = render_chat("chatml", [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]])
def test_bad_messages_are_rejected(messages):
    with pytest.raises(ChatFormatError):
        render_chat("gemma", messages)


@pytest.mark.parametrize("recipe", all_recipes(), ids=lambda r: r.name)
def test_defaults_per_target(recipe):
    assert recipe.default_precision_for("onnx") == recipe.default_precision
    assert recipe.default_precision_for("trtllm") == "int8"  # no recipe says otherwise today
    assert recipe.default_graph_for("onnx") == recipe.default_graph and recipe.default_graph_for("trtllm") == "optimum"
    for target in ("onnx", "trtllm"):
        assert recipe.supports(target, recipe.default_precision_for(target))
    with pytest.raises(TargetNotSupportedError, match="does not support tpu"):
        recipe.default_precision_for("tpu")


def test_target_not_supported_error_names_target_and_supported_ones():
    recipe = get_recipe("qwen2-7b-instruct")
    recipe.check_supports("onnx", "fp32")
    with pytest.raises(TargetNotSupportedError) as info:
        recipe.check_supports("trtllm", "fp32")
    assert str(info.value) == (
        "recipe 'qwen2-7b-instruct' does not support trtllm at fp32; "
        "it supports onnx (fp32, fp16, int8); trtllm (fp16, int8) (see `toolkit recipes`)"
    )
    assert (info.value.target, info.value.precision) == ("trtllm", "fp32") and isinstance(info.value, ValueError)
    with pytest.raises(TargetNotSupportedError, match="does not support tpu;"):
        recipe.check_supports("tpu", "int8")
