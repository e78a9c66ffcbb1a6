"""The long golden prompts (issue #10): built per checkpoint past its sliding window, and able to fail
validation on their own when an engine loses the tokens outside a window."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_models import build_tokenizer, tiny_config

from toolkit.cli import main
from toolkit.export.golden import (GREEDY_TOKENS, LONG_PROMPT_TOKENS, Reference, golden_cases, long_golden_cases,
                                   long_prompt_target, sliding_window_of)
from toolkit.export.ort_runner import OrtCausalLM
from toolkit.export.validate import validate_runner
from toolkit.recipes import all_recipes, get_recipe
from toolkit.recipes.chat_format import render_chat

RECIPES = [r.name for r in all_recipes()]


def _tiny_tokenizer_and_config(recipe):
    tokenizer = build_tokenizer(recipe.chat_format)
    return tokenizer, tiny_config(recipe.architecture, tokenizer).to_dict()


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_long_prompt_exists_and_reaches_past_the_window(recipe_name):
    """Every recipe's tiny checkpoint: one long prompt, longer than every short chat and than the sliding
    window, within the context with room for the greedy tokens, and the lines it asks about lie more
    than a window before its end."""
    recipe = get_recipe(recipe_name)
    tokenizer, config = _tiny_tokenizer_and_config(recipe)
    context = min(recipe.context_window, config["max_position_embeddings"])
    window = sliding_window_of(config)
    assert (window == 16) == (recipe.architecture == "gemma3_text")  # only Gemma 3 slides (Qwen2 has it off)
    [case] = long_golden_cases(tokenizer, recipe.chat_format, context)
    target = long_prompt_target(context)
    assert target == 409 and len(case.prompt_ids) + GREEDY_TOKENS <= context
    assert target - 60 < len(case.prompt_ids) <= target  # trimmed by whole lines (< 60 tokens each here)
    assert len(case.prompt_ids) > max(len(c.prompt_ids) for c in golden_cases(tokenizer, recipe.chat_format))
    assert len(case.prompt_ids) > 4 * (window or 16)
    text = render_chat(recipe.chat_format, case.messages)
    asked = text[: text.index("\n5. Locker 0005")]  # up to the end of line 4, the last line asked about
    after = len(case.prompt_ids) - len(tokenizer(asked, add_special_tokens=False)["input_ids"])
    assert after > 128 > (window or 0), "the lines asked about must lie outside the window (and the 128 kept below)"
    assert "Repeat lines 2, 3 and 4" in case.messages[-1]["content"] and case.name == f"long {len(case.prompt_ids)}"
    assert long_golden_cases(tokenizer, recipe.chat_format, context)[0].prompt_ids == case.prompt_ids  # deterministic


def test_long_prompt_for_a_large_context_is_over_2k_tokens():
    """With the default model's 32,768-token context the target is 2,304 tokens (> 2,048, > its 512 window)."""
    recipe = get_recipe("default")
    tokenizer = build_tokenizer(recipe.chat_format)
    assert long_prompt_target(recipe.context_window) == LONG_PROMPT_TOKENS == 2304
    [case] = long_golden_cases(tokenizer, recipe.chat_format, recipe.context_window)
    assert 2048 < len(case.prompt_ids) <= 2304
    assert long_prompt_target(4096) == 2304 and long_prompt_target(2048) == 1638 and long_prompt_target(512) == 409
    assert sliding_window_of({"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]}) == 512
    assert sliding_window_of({"sliding_window": 4096, "use_sliding_window": False}) is None
    assert sliding_window_of({"sliding_window": 512, "layer_types": ["full_attention"]}) is None


class LastTokensRunner:
    """A broken engine over a correct one: it attends only to the prompt's last ``keep`` tokens (a KV
    cache cut to N tokens, a sliding window applied to every layer, a truncating context limit)."""

    def __init__(self, inner, keep: int):
        self.inner, self.keep = inner, keep

    def greedy(self, prompt_ids, max_new_tokens):
        return self.inner.greedy(list(prompt_ids)[-self.keep :], max_new_tokens)

    def teacher_forced(self, prompt_ids, continuation):
        return self.inner.teacher_forced(list(prompt_ids)[-self.keep :], continuation)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_engine_that_forgets_old_tokens_fails_only_on_the_long_prompt(tiny_engine, precision):
    """The tiny Gemma 3 engine, truncated to its last 128 prompt tokens (more than every short chat):
    the short chats still pass the precision's bars, the long prompt fails them, and so does validation."""
    engine_dir = tiny_engine(get_recipe("default"), precision)
    reference = Reference.load(engine_dir)
    assert max(len(c.prompt_ids) for c in reference.cases) < 128 < len(reference.long_cases[0].prompt_ids)
    inner = OrtCausalLM(engine_dir / "model.onnx")
    good = validate_runner(inner, reference, precision)
    assert good.passed, good.failures  # the real engine passes, long prompt included
    result = validate_runner(LastTokensRunner(inner, keep=128), reference, precision)
    assert not result.passed
    assert result.failures and all(f.startswith("long prompts (") for f in result.failures), result.failures
    assert result.cases == good.cases  # short chats unaffected
    [long_row] = result.long_cases
    assert long_row.prompt_tokens == len(reference.long_cases[0].prompt_ids)
    assert long_row.cosine < 0.995 or long_row.max_abs_diff > 3.0 or long_row.top1_agreement < 0.93


def test_validate_prints_the_long_row_and_old_references_still_load(tiny_engine, tmp_path):
    """``toolkit validate`` shows the long prompt as its own row; a reference.json from before the long
    set (no ``long_cases``) still loads and validates on its short chats."""
    engine_dir = tiny_engine(get_recipe("qwen2-7b-instruct"), "fp32")
    result = CliRunner().invoke(main, ["validate", str(engine_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    reference = Reference.load(engine_dir)
    assert f"long ({len(reference.long_cases[0].prompt_ids):,} tokens)" in result.output
    stored = json.loads((engine_dir / "reference.json").read_text())
    for key in ("long_cases", "long_prompt_target", "sliding_window"):
        del stored[key]
    for case in stored["cases"]:
        del case["name"]
    (tmp_path / "reference.json").write_text(json.dumps(stored))
    old = Reference.load(tmp_path)
    assert old.long_cases == [] and len(old.cases) == len(reference.cases)
    verdict = validate_runner(OrtCausalLM(engine_dir / "model.onnx"), old, "fp32")
    assert verdict.passed and verdict.long is None and verdict.long_cases == []
