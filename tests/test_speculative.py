"""Speculative decoding (prompt lookup, OpenAI ``prediction``): greedy output token-identical to plain decoding,
KV rollback, stops inside an accepted run, rejection sampling preserving the target distribution, usage over HTTP."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from engine_helpers import until_idle

from toolkit.artifact import native_attention
from toolkit.recipes import get_recipe
from toolkit.runtime import load_engine
from toolkit.runtime.sampler import sample_token, verify_draft
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.scheduler import SchedulerConfig
from toolkit.runtime.speculative import SpeculativeConfig, Speculator, find_continuation
from toolkit.runtime.types import GenerateRequest

GRAPHS = ("optimum", "gqa")
QWEN = get_recipe("qwen2-7b-instruct")
GREEDY = dict(temperature=0, ignore_eos=True)
OFF = SpeculativeConfig(prompt_lookup=False, predicted_outputs=True)
QUESTIONS = ("Repeat after me: the red fox jumps over the red fox and the red fox again.",
             "Write a Python function that reverses a string.",
             "List the colours red, green, blue, red, green, blue.")


async def started(engine_dir, **options):
    engine = load_engine(engine_dir, **options)
    await engine.start()
    return engine


def _prompt(engine, question: str) -> tuple[int, ...]:
    return tuple(engine.prompts.encode([{"role": "user", "content": question}]))


async def _run(engine, prompt, max_tokens=40, prediction=None, **params):
    """(tokens, text, finish_reason, last output, logprobs) of one request."""
    options = {**GREEDY, **params}
    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, **options),
                              prediction_ids=tuple(prediction) if prediction is not None else None)
    tokens, text, last, logprobs = [], "", None, []
    async for out in await engine.generate(request):
        for choice in out.choices:
            tokens.extend(choice.token_ids)
            text += choice.text
            logprobs.extend((lp.token_id, round(lp.logprob, 4)) for lp in choice.logprobs or ())
        last = out
    return tokens, text, last.choices[0].finish_reason, last, logprobs


async def _runs_with_drafts(plain, spec, prompts):
    """Plain decoding's runs of ``prompts``, and ``spec``'s: without a prediction, with plain decoding's
    output as the prediction, and with that prediction edited midway (its tokens 10-14 replaced)."""
    expected = [await _run(plain, p) for p in prompts]
    got = [await _run(spec, p) for p in prompts]
    right = [await _run(spec, p, prediction=e[0]) for p, e in zip(prompts, expected)]
    edited = [await _run(spec, p, prediction=e[0][:10] + [7] * 5 + e[0][15:]) for p, e in zip(prompts, expected)]
    return expected, got, right, edited


# ---- units -----------------------------------------------------------------------------------------
def test_find_continuation_prefers_the_longest_then_the_latest_match():
    source = np.array([1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3])
    assert find_continuation(source, source.size, source, 3, 1, source.size - 1) == 3  # [1,2,3] -> 9
    assert find_continuation(np.array([5, 2, 3]), 3, source, 3, 2, source.size) == 7  # [5,2,3] -> 7
    assert find_continuation(np.array([0, 3]), 2, source, 2, 1, source.size) == 7  # only [3]: latest with a follower
    assert find_continuation(np.array([4, 4]), 2, source, 2, 2, source.size) is None


class _Seq:
    def __init__(self, prompt, output, prediction=None):
        class _Request:
            prediction_ids = prediction

        class _Group:
            prompt_ids = tuple(prompt)
            request = _Request()

        class _Sampler:
            constraint = None

        self.group, self.sampler, self.output_ids, self.seq_id = _Group(), _Sampler(), list(output), "s"


def test_prediction_drafts_follow_the_output_and_resynchronise_after_an_edit():
    prediction = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    spec = Speculator(SpeculativeConfig(prompt_lookup=False, predicted_outputs=True, max_draft=4))
    seq = _Seq([1, 2], [10, 11], prediction)
    assert spec.drafts([seq], [100]) == [[12, 13, 14, 15]]
    seq.output_ids += [12, 13, 99]  # two accepted, then the model's own token (an edit)
    spec.record(seq, [12, 13, 14, 15], [12, 13, 99])
    assert spec.drafts([seq], [100]) is None  # out of sync: [13, 99] is nowhere in the prediction
    seq.output_ids += [15, 16]  # the output is back on the predicted text after the edit
    assert spec.drafts([seq], [100]) == [[17, 18, 19]]  # [15, 16] found again; cap adapted to accepted + 1 = 3
    assert spec.prediction_counts(seq) == (4, 2)  # 10 11 12 13 followed in order (15 16 only re-found); 14 15 discarded
    assert spec.drafts([seq], [3]) == [[17, 18]] and spec.drafts([seq], [2]) == [[17]]  # a draft leaves room for one more


def test_a_request_with_a_prediction_also_drafts_from_its_prompt_when_lookup_is_off():
    """Engine-wide prompt lookup off (quantized engines' default): a request that sent ``prediction`` asked for
    speculation, so where its output leaves the prediction the prompt still offers drafts; others get none."""
    spec = Speculator(SpeculativeConfig(prompt_lookup=False, predicted_outputs=True, max_draft=4))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    with_prediction = _Seq(prompt, [5, 6], prediction=[40, 41, 42])  # the output is not in the prediction
    without = _Seq(prompt, [5, 6])
    without.seq_id = "t"
    assert spec.drafts([with_prediction], [100]) == [[7, 8, 5, 6]]  # [5, 6] found in prompt + output
    assert spec.drafts([without], [100]) is None


def test_misses_shrink_the_draft_and_back_off():
    spec = Speculator(SpeculativeConfig(max_draft=8, prompt_lookup=True, predicted_outputs=True))
    seq = _Seq([5, 6, 7, 8, 5, 6], [])
    steps = []
    for _ in range(12):
        draft = (spec.drafts([seq], [100]) or [[]])[0]
        steps.append(len(draft))
        if draft:
            spec.record(seq, draft, [99])  # never accepted
    # [5, 6] -> [7, 8, 5, 6]; the cap halves after each miss and from the second miss the sequence
    # waits 2, 4, 8 ... steps before it drafts again
    assert steps == [4, 4, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0]


def test_rejection_sampling_preserves_the_target_distribution():
    """Draws through verify_draft with a fixed (wrong) draft follow p; a variant that keeps the draft token
    in the resample (a classic bug) would over-weight it by p(d)(1 - p(d)) = 0.16, far outside the tolerance."""
    rng = np.random.default_rng(1234)
    logits = np.log(np.array([0.2, 0.5, 0.1, 0.15, 0.05], np.float32))
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    n = 40_000
    for draft in (0, 1, 4):
        counts = np.bincount([verify_draft(logits, draft, **params, rng=rng) for _ in range(n)], minlength=5)
        expected = np.exp(logits) / np.exp(logits).sum()
        chi2 = float((((counts - n * expected) ** 2) / (n * expected)).sum())
        assert chi2 < 20.5, (draft, counts, chi2)  # chi-square 4 dof, p = 0.0004
    # truncation: with top_k=2 the draft outside the top 2 is never kept and the result follows the truncated p
    counts = np.bincount([verify_draft(logits, 2, 1.0, 2, 1.0, 0.0, rng) for _ in range(20_000)], minlength=5)
    assert counts[2] == 0 and counts[0] + counts[1] == 20_000
    assert abs(counts[1] / 20_000 - 0.5 / 0.7) < 0.02
    plain = np.bincount([sample_token(logits, 0.7, 0, 0.9, 0.0, rng.random()) for _ in range(20_000)], minlength=5)
    spec = np.bincount([verify_draft(logits, 3, 0.7, 0, 0.9, 0.0, rng) for _ in range(20_000)], minlength=5)
    assert np.abs(plain / 20_000 - spec / 20_000).max() < 0.02  # temperature + top_p: the same distribution


# ---- engine: greedy identity ---------------------------------------------------------------------------
@pytest.mark.parametrize("graph", GRAPHS)
def test_greedy_tokens_identical_with_prompt_lookup_and_prediction(graph, tiny_engine):
    engine_dir = tiny_engine(QWEN, "fp32", graph)

    async def main():
        plain = await started(engine_dir, speculative=OFF)
        spec = await started(engine_dir, speculative=SpeculativeConfig(max_draft=6, ngram_min=1))
        prompts = [_prompt(plain, q) for q in QUESTIONS]
        expected, got, right, half = await _runs_with_drafts(plain, spec, prompts)
        garbage = [await _run(spec, p, prediction=list(range(30, 90))) for p in prompts]
        drafted, accepted = spec.speculator.drafted, spec.speculator.accepted
        stats = await until_idle(spec)
        for engine in (plain, spec):
            await engine.stop()
        return expected, got, right, half, garbage, drafted, accepted, stats

    expected, got, right, half, garbage, drafted, accepted, stats = asyncio.run(main())
    for runs in (got, right, half, garbage):
        assert [r[:3] for r in runs] == [e[:3] for e in expected]
    assert drafted > 0 and accepted > 0 and stats.kv_cache_used_tokens == 0
    for (tokens, *_), (_, _, _, out, _) in zip(expected, right):  # prediction == output: every token foreseen, none discarded
        assert (out.accepted_prediction_tokens, out.rejected_prediction_tokens) == (len(tokens), 0)
        assert out.completion_tokens == len(tokens)
    for _, _, _, out, _ in half:
        assert out.rejected_prediction_tokens > 0 and out.accepted_prediction_tokens >= 30
    assert all(out.accepted_prediction_tokens < 5 for _, _, _, out, _ in garbage)
    assert all(out.accepted_prediction_tokens == out.rejected_prediction_tokens == 0 for _, _, _, out, _ in got)


@pytest.mark.parametrize("graph", GRAPHS)
def test_several_rows_with_different_drafts_decode_as_plain(graph, tiny_engine):
    """Rows with long, short, wrong and no drafts verify together (padded, rolled back per row), joining
    at different times; every row's tokens equal plain decoding's."""
    engine_dir = tiny_engine(QWEN, "fp32", graph)

    async def main():
        config = SchedulerConfig(max_batch_size=4, max_num_tokens=64, prefix_cache=False)
        plain = await started(engine_dir, speculative=OFF, config=config)
        spec = await started(engine_dir, speculative=SpeculativeConfig(max_draft=5, ngram_min=1, max_batch=4),
                             config=config)
        prompts = [_prompt(plain, q) for q in QUESTIONS] + [_prompt(plain, "Say something new.")]
        expected = [await _run(plain, p, max_tokens=48) for p in prompts]
        predictions = [expected[0][0], expected[1][0][:6] + [3, 4, 5] + expected[1][0][9:], None, list(range(40, 80))]

        async def later(i):
            await asyncio.sleep(0.01 * i)
            return await _run(spec, prompts[i], max_tokens=48, prediction=predictions[i])

        got = await asyncio.gather(*(later(i) for i in range(len(prompts))))
        verified = spec.speculator.drafted
        stats = await until_idle(spec)
        for engine in (plain, spec):
            await engine.stop()
        return expected, got, verified, stats

    expected, got, verified, stats = asyncio.run(main())
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert verified > 0 and stats.kv_cache_used_tokens == 0


@pytest.mark.parametrize("graph", GRAPHS)
def test_stops_and_max_tokens_cut_inside_an_accepted_run(graph, tiny_engine):
    """With the prediction equal to the output every draft is accepted, so a stop string, a stop token or
    max_tokens lands inside an accepted run: the outputs (text, tokens, finish_reason, logprobs) equal plain's."""
    engine_dir = tiny_engine(QWEN, "fp32", graph)

    async def main():
        plain = await started(engine_dir, speculative=OFF)
        spec = await started(engine_dir, speculative=SpeculativeConfig(max_draft=8))
        prompt = _prompt(plain, QUESTIONS[0])
        full, text, *_ = await _run(plain, prompt, max_tokens=40)
        stop_text = text[len(text) // 2: len(text) // 2 + 3]
        cases = [dict(max_tokens=13), dict(max_tokens=40, stop_token_ids=[full[17]]),
                 dict(max_tokens=40, stop=[stop_text]), dict(max_tokens=40, stop=[stop_text], include_stop_str_in_output=True),
                 dict(max_tokens=21, logprobs=True, top_logprobs=2), dict(max_tokens=30, min_tokens=25, stop_token_ids=[full[3]])]
        results = []
        for case in cases:
            a = await _run(plain, prompt, **case)
            b = await _run(spec, prompt, prediction=full, **case)
            results.append((a, b))
        for engine in (plain, spec):
            await engine.stop()
        return results

    results = asyncio.run(main())
    for (tokens, text, reason, out, logprobs), (s_tokens, s_text, s_reason, s_out, s_logprobs) in results:
        assert (s_tokens, s_text, s_reason, s_logprobs) == (tokens, text, reason, logprobs)
        assert s_out.completion_tokens == out.completion_tokens
    assert any(run[4] for run, _ in results)  # the logprobs case produced some


def test_kv_rollback_then_decoding_continues_like_plain(tiny_engine):
    """Runner level, both graphs: verify a draft whose second token is wrong, roll back to the accepted
    prefix, then decode on; the logits equal a plain decode of the same tokens."""
    from toolkit.runtime.model_runner import create_runner

    for graph in GRAPHS:
        engine_dir = tiny_engine(QWEN, "fp32", graph)
        runner = create_runner(graph, engine_dir / "model.onnx", 1, 512, verify=True)
        prompt = list(range(5, 25))
        _, past = runner.prefill(prompt, None, 0)
        plain, spec = runner.new_batch(), runner.new_batch()
        plain.add_rows(past, [len(prompt)])
        spec.add_rows(past, [len(prompt)])
        position = len(prompt)
        spec_logits = runner.verify(spec, [[30, 31, 99, 98]], [position]).copy()  # valid until the next run
        spec.rollback([2], 4)  # keep 30 (the last token) and 31 (an accepted draft)
        for i, token in enumerate([30, 31]):
            step = runner.decode(plain, [token], [position + i])
            assert np.allclose(step[0], spec_logits[0, i], atol=1e-4)
        for i, token in enumerate([40, 41, 42]):  # continue after the rollback: both caches agree
            a = runner.decode(plain, [token], [position + 2 + i]).copy()
            b = runner.decode(spec, [token], [position + 2 + i])
            assert np.allclose(a, b, atol=1e-4), graph


@pytest.mark.parametrize("operator", ["ours", "onnxruntime"])
def test_int8_verify_logits_follow_plain_decoding(tiny_engine, monkeypatch, operator):
    """The int8 gqa engine (per-row int8 LM head, ``export/rowwise_int8.py``): a verify run's logits at every
    fed position are plain decoding's up to int8 rounding, and bitwise where the attention runs on our
    operator. The verify graph's position slice must feed the head's row scales too: taking them from the
    last position alone skewed every earlier position."""
    from toolkit.runtime.model_runner import create_runner

    monkeypatch.setenv(native_attention.ENV_SWITCH, "1" if operator == "ours" else "0")
    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")
    runner = create_runner("gqa", engine_dir / "model.onnx", 1, 512, verify=True)
    assert runner.native_attention == (operator == "ours" and native_attention.available())
    prompt = [2, *range(40, 60)]
    _, past = runner.prefill(prompt, None, 0)
    plain, spec = runner.new_batch(), runner.new_batch()
    plain.add_rows(past, [len(prompt)])
    spec.add_rows(past, [len(prompt)])
    fed = [30, 31, 32, 33, 34]
    spec_logits = runner.verify(spec, [fed], [len(prompt)])[0].copy()  # the runner reuses its logits buffer
    plain_logits = np.stack([runner.decode(plain, [t], [len(prompt) + i])[0].copy() for i, t in enumerate(fed)])
    spread = plain_logits.max() - plain_logits.min()
    assert np.abs(spec_logits - plain_logits).max() < 0.05 * spread
    assert (spec_logits.argmax(axis=-1) == plain_logits.argmax(axis=-1)).mean() >= 0.8
    if runner.native_attention:
        assert np.array_equal(spec_logits.view(np.uint32), plain_logits.view(np.uint32))


# ---- server: prediction over HTTP -------------------------------------------------------------------------
KEY = "spec-key"


@pytest.fixture(scope="module")
def served_spec(tiny_engine):
    from fake_engine import LiveServer

    from toolkit.server.serve import build_app

    app = build_app([tiny_engine(QWEN, "fp32", "gqa")], [KEY], grace_s=1.0)
    with LiveServer(app) as live:
        yield live


def _chat(served, **extra):
    import httpx

    body = {"model": QWEN.model_names[0], "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(served.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_prediction_usage_over_http(served_spec):
    plain = _chat(served_spec)
    assert plain.status_code == 200, plain.text
    assert "completion_tokens_details" not in plain.json()["usage"]
    text = plain.json()["choices"][0]["message"]["content"]
    for prediction in ({"type": "content", "content": text},
                       {"type": "content", "content": [{"type": "text", "text": text[:5]}, {"type": "text", "text": text[5:]}]}):
        reply = _chat(served_spec, prediction=prediction)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"] == text
        details = body["usage"]["completion_tokens_details"]
        # the reply's text tokenized again may split differently from the generated ids at a few places
        # (each costs a draft token and the couple of tokens before the n-gram re-synchronisation)
        assert details["rejected_prediction_tokens"] <= 3
        assert details["accepted_prediction_tokens"] >= body["usage"]["completion_tokens"] // 2
    garbage = _chat(served_spec, prediction={"type": "content", "content": "~" * 40}).json()
    assert garbage["choices"][0]["message"]["content"] == text
    assert garbage["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 0


@pytest.mark.parametrize("prediction, param", [
    ("just text", "prediction"), ({"type": "text", "content": "x"}, "prediction"), ({"content": "x"}, "prediction"),
    ({"type": "content", "content": 5}, "prediction.content"), ({"type": "content", "content": [{"type": "image"}]}, "prediction.content"),
    ({"type": "content", "content": [{"type": "text", "text": 3}]}, "prediction.content"),
    ({"type": "content", "content": "x", "extra": 1}, "prediction"),
])
def test_bad_prediction_shapes_are_a_400_naming_the_field(served_spec, prediction, param):
    response = _chat(served_spec, prediction=prediction)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_serve_options_reach_the_engine(tiny_engine):
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.server.serve import load_engines

    engine_dir = tiny_engine(QWEN, "fp32", "gqa")
    engine = load_engines([engine_dir], speculative={"prompt_lookup": False, "max_draft": 3})[QWEN.name]
    assert (engine.speculative.prompt_lookup, engine.speculative.max_draft) == (False, 3)
    assert load_engines([engine_dir])[QWEN.name].speculative == SpeculativeConfig(prompt_lookup=True, predicted_outputs=True)  # fp32: on
    result = CliRunner().invoke(main, ["serve", str(engine_dir), "--max-draft-tokens", "0"])
    assert result.exit_code == 2 and "--max-draft-tokens" in result.output


def test_speculation_is_on_by_default_where_verify_runs_reproduce_decoding(tiny_engine, monkeypatch):
    """fp32 engines, and int8 GQA engines on our attention operator, verify bitwise as they decode; elsewhere
    quantized verify runs are not plain decoding (SpeculativeConfig's doc), so drafting from the prompt and
    from ``prediction`` are opt-in there: ``toolkit serve --prompt-lookup`` / ``--predicted-outputs``."""
    from toolkit.server.serve import engine_options, load_engines

    default = get_recipe("default")
    int8_dir = tiny_engine(default, "int8", "gqa")
    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    ours = native_attention.available()
    int8 = load_engines([int8_dir])[default.name].speculative
    assert (int8.prompt_lookup, int8.predicted_outputs) == (ours, ours)
    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    int8 = load_engines([int8_dir])[default.name].speculative
    assert (int8.prompt_lookup, int8.predicted_outputs) == (False, False)
    fp32 = load_engines([tiny_engine(default, "fp32", "gqa")])[default.name].speculative
    assert (fp32.prompt_lookup, fp32.predicted_outputs) == (True, True)
    assert engine_options()["speculative"] == {}
    for flag in (True, False):
        options = engine_options(prompt_lookup=flag, predicted_outputs=not flag)
        assert options["speculative"] == {"prompt_lookup": flag, "predicted_outputs": not flag}
        chosen = load_engines([int8_dir], speculative=options["speculative"])[default.name].speculative
        assert (chosen.prompt_lookup, chosen.predicted_outputs) == (flag, not flag)


def test_int8_prediction_changes_nothing_unless_the_operator_opts_in(tiny_engine, monkeypatch):
    """On an int8 engine whose verify runs are not bitwise (onnxruntime's attention) by default a request's
    ``prediction`` is accepted, its tokens are plain decoding's (no verify step runs) and it reports no
    prediction counts; with ``predicted_outputs=True`` the same request speculates and counts what the
    prediction foresaw."""
    from toolkit.server.openai.routes import counts_prediction

    monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")

    async def main():
        plain = await started(engine_dir, speculative=SpeculativeConfig(enabled=False))
        default = await started(engine_dir)
        opted = await started(engine_dir, speculative=SpeculativeConfig(predicted_outputs=True, max_draft=6))
        prompt = _prompt(plain, QUESTIONS[0])
        expected = await _run(plain, prompt)
        by_default = await _run(default, prompt, prediction=expected[0])
        by_opt_in = await _run(opted, prompt, prediction=expected[0])
        verified = (default.speculator, opted.speculator.drafted)  # by default: the graph as exported, no speculator
        reported = (counts_prediction(default), counts_prediction(opted))  # usage's completion_tokens_details
        for engine in (plain, default, opted):
            await engine.stop()
        return expected, by_default, by_opt_in, verified, reported

    expected, by_default, by_opt_in, (speculator_default, drafted_opted), reported = asyncio.run(main())
    assert by_default[0] == expected[0] and speculator_default is None
    assert (by_default[3].accepted_prediction_tokens, by_default[3].rejected_prediction_tokens) == (0, 0)
    assert reported == (False, True)
    assert drafted_opted > 0 and by_opt_in[3].accepted_prediction_tokens > 0


@pytest.mark.skipif(not native_attention.available(),
                    reason="no AVX-512 or no C compiler: int8 engines keep onnxruntime's attention and speculation is opt-in there "
                           "(test_int8_prediction_changes_nothing_unless_the_operator_opts_in)")
def test_int8_gqa_greedy_tokens_identical_with_prompt_lookup_and_prediction(tiny_engine, monkeypatch):
    """On our attention operator an int8 engine speculates by default and its greedy tokens are plain
    decoding's: with prompt lookup, with the right prediction, and with a prediction edited midway."""
    monkeypatch.delenv(native_attention.ENV_SWITCH, raising=False)
    engine_dir = tiny_engine(get_recipe("default"), "int8", "gqa")

    async def main():
        plain = await started(engine_dir, speculative=SpeculativeConfig(enabled=False))
        spec = await started(engine_dir, speculative=SpeculativeConfig(max_draft=6, ngram_min=1))
        expected, got, right, edited = await _runs_with_drafts(plain, spec, [_prompt(plain, q) for q in QUESTIONS])
        drafted, accepted = spec.speculator.drafted, spec.speculator.accepted
        for engine in (plain, spec):
            await engine.stop()
        return expected, got, right, edited, drafted, accepted

    expected, got, right, edited, drafted, accepted = asyncio.run(main())
    for runs in (got, right, edited):
        assert [r[0] for r in runs] == [e[0] for e in expected]
    assert drafted > 0 and accepted > 0
    for (tokens, *_), (_, _, _, out, _) in zip(expected, right):
        assert (out.accepted_prediction_tokens, out.rejected_prediction_tokens) == (len(tokens), 0)
