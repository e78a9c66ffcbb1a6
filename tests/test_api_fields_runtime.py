"""The sampling fields added for issue #11, on the samplers and on a real tiny ONNX engine.

logit_bias (+100 forces a token under greedy, -100 bans it), min_tokens (stop tokens banned until
reached), stop_token_ids, ignore_eos, include_stop_str_in_output, skip_special_tokens, and the
stop token that ended a sequence: counted in completion_tokens, absent from text and logprobs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.engines.trtllm_sampling import build_trtllm_sampling_params, to_trtllm_sampling_kwargs
from toolkit.runtime.sampler import SequenceSampler
from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams
from toolkit.runtime.types import GenerateRequest

GREEDY = dict(temperature=0.0)


def test_logit_bias_forces_and_bans_on_the_sampler():
    logits = np.array([0.0, 5.0, 1.0, 2.0], dtype=np.float32)
    assert SequenceSampler(SamplingParams(**GREEDY)).sample(logits, []).token_id == 1
    assert SequenceSampler(SamplingParams(logit_bias={2: 100}, **GREEDY)).sample(logits, []).token_id == 2
    assert SequenceSampler(SamplingParams(logit_bias={1: -100}, **GREEDY)).sample(logits, []).token_id == 3
    banned = SequenceSampler(SamplingParams(temperature=1.0, seed=3, logit_bias={1: -100, 3: -100, 0: -100}))
    assert {banned.sample(logits, []).token_id for _ in range(50)} == {2}
    assert SequenceSampler(SamplingParams(**GREEDY)).sample(logits, [], banned=(1, 3)).token_id == 2


@pytest.mark.parametrize("bias, param", [({1: 101}, "logit_bias"), ({-1: 5}, "logit_bias"),
                                         ({1: float("nan")}, "logit_bias")])
def test_logit_bias_out_of_range_names_the_field(bias, param):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == param


def test_trtllm_mapping_of_the_new_fields():
    kwargs = to_trtllm_sampling_kwargs(SamplingParams(min_tokens=3, logit_bias={5: 2.5}))
    assert kwargs["min_tokens"] == 3 and kwargs["embedding_bias"] == {5: 2.5}

    class Module:
        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

    built = build_trtllm_sampling_params(Module, SamplingParams(logit_bias={5: 2.5}), vocab_size=8)
    assert built.kwargs["embedding_bias"].tolist() == [0, 0, 0, 0, 0, 2.5, 0, 0]
    for params, field in ((SamplingParams(logit_bias={5: 2.5}), "logit_bias"),
                          (SamplingParams(include_stop_str_in_output=True), "include_stop_str_in_output"),
                          (SamplingParams(skip_special_tokens=False), "skip_special_tokens")):
        with pytest.raises(InvalidParameterError) as info:
            build_trtllm_sampling_params(Module, params)
        assert info.value.param == field


# ---- on a real tiny engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_dir(tiny_engine):
    return tiny_engine(get_recipe("gemma-7b-it"))


def run(engine_dir, prompt_ids, **params):
    """(token ids, text, finish reason, completion_tokens, logprob token ids) of one greedy choice."""

    async def main():
        engine = load_engine(engine_dir)
        await engine.start()
        try:
            tokens, text, reason, completion, lp = [], "", None, 0, []
            request = GenerateRequest(tuple(prompt_ids), SamplingParams(**{**GREEDY, **params}))
            async for out in await engine.generate(request):
                for c in out.choices:
                    tokens += c.token_ids
                    text += c.text
                    lp += [t.token_id for t in c.logprobs or ()]
                    reason = c.finish_reason or reason
                completion = out.completion_tokens
            return tokens, text, reason, completion, lp, engine.prompts
        finally:
            await engine.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def prompt(engine_dir):
    from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

    builder = PromptBuilder(load_tokenizer(engine_dir), get_recipe("gemma-7b-it"))
    return builder.encode(messages=[{"role": "user", "content": "hello there"}])


def test_logit_bias_plus_100_forces_and_minus_100_bans_on_the_engine(engine_dir, prompt):
    plain, *_ = run(engine_dir, prompt, max_tokens=6, ignore_eos=True)
    forced = 40 if plain[0] != 40 else 41
    tokens, *_ = run(engine_dir, prompt, max_tokens=6, ignore_eos=True, logit_bias={forced: 100})
    assert tokens == [forced] * 6
    banned, *_ = run(engine_dir, prompt, max_tokens=6, ignore_eos=True, logit_bias={t: -100 for t in set(plain)})
    assert not set(banned) & set(plain)


def test_stop_token_counts_but_is_neither_text_nor_logprob(engine_dir, prompt):
    _, _, _, _, _, prompts = run(engine_dir, prompt, max_tokens=1)
    eos = min(prompts.eos_ids)
    tokens, text, reason, completion, lp, _ = run(engine_dir, prompt, max_tokens=8, logit_bias={eos: 100},
                                                  logprobs=True)
    assert (tokens, text, reason, completion, lp) == ([eos], "", "stop", 1, [])
    # ignore_eos: the same forced token no longer stops the sequence
    tokens, _, reason, completion, _, _ = run(engine_dir, prompt, max_tokens=4, logit_bias={eos: 100}, ignore_eos=True)
    assert (tokens, reason, completion) == ([eos] * 4, "length", 4)


def test_min_tokens_bans_the_stop_tokens_until_reached(engine_dir, prompt):
    _, _, _, _, _, prompts = run(engine_dir, prompt, max_tokens=1)
    eos = min(prompts.eos_ids)
    tokens, _, reason, completion, _, _ = run(engine_dir, prompt, max_tokens=8, min_tokens=3, logit_bias={eos: 100})
    assert len(tokens) == 4 and tokens[3] == eos and eos not in tokens[:3]
    assert (reason, completion) == ("stop", 4)


def test_stop_token_ids_end_the_sequence_and_include_stop_str_keeps_it(engine_dir, prompt):
    plain, text, *_ = run(engine_dir, prompt, max_tokens=6, ignore_eos=True)
    stop = plain[2]
    first = plain.index(stop)
    tokens, cut, reason, completion, lp, prompts = run(engine_dir, prompt, max_tokens=6, ignore_eos=True,
                                                       stop_token_ids=[stop], logprobs=True)
    assert tokens == plain[:first + 1] and reason == "stop" and completion == first + 1
    assert lp == plain[:first]  # the stop token has no logprob
    _, kept, _, _, lp, _ = run(engine_dir, prompt, max_tokens=6, ignore_eos=True, stop_token_ids=[stop],
                               include_stop_str_in_output=True, logprobs=True)
    assert kept.startswith(cut) and len(kept) > len(cut) and lp == plain[:first + 1]


def test_include_stop_str_in_output_keeps_the_stop_string(engine_dir, prompt):
    _, text, *_ = run(engine_dir, prompt, max_tokens=12, ignore_eos=True)
    stop = text.strip()[3:5]
    assert stop and stop in text
    _, cut, reason, *_ = run(engine_dir, prompt, max_tokens=12, ignore_eos=True, stop=[stop])
    _, kept, reason2, *_ = run(engine_dir, prompt, max_tokens=12, ignore_eos=True, stop=[stop],
                               include_stop_str_in_output=True)
    assert reason == reason2 == "stop" and kept == cut + stop and stop not in cut


def test_skip_special_tokens_false_shows_special_tokens(engine_dir, prompt):
    _, _, _, _, _, prompts = run(engine_dir, prompt, max_tokens=1)
    special = prompts.tokenizer.convert_tokens_to_ids("<start_of_turn>")
    _, skipped, *_ = run(engine_dir, prompt, max_tokens=2, logit_bias={special: 100})
    _, shown, *_ = run(engine_dir, prompt, max_tokens=2, logit_bias={special: 100}, skip_special_tokens=False)
    assert skipped == "" and shown == "<start_of_turn><start_of_turn>"
