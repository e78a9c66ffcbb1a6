"""SamplingParams validation and SequenceSampler behaviour (statistical where it must be)."""

import dataclasses
import math

import numpy as np
import pytest

from toolkit.runtime.sampler import (
    SequenceSampler,
    _top_p_filter,
    greedy_tokens,
    raw_logprobs,
    sample_token,
    top_k_indices,
)
from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

DRAWS = 4000


def _logits(probs, vocab=None, fill=-np.inf):
    """Row whose softmax is ``probs`` on the first ids (rest at ``fill``)."""
    row = np.full(vocab or len(probs), fill, dtype=np.float32)
    row[: len(probs)] = np.log(np.asarray(probs, dtype=np.float64))
    return row


def _empirical(params, logits, draws=DRAWS, prompt_ids=()):
    sampler = SequenceSampler(params, prompt_ids=prompt_ids)
    counts = np.bincount([sampler.sample(logits, []).token_id for _ in range(draws)],
                         minlength=logits.size)
    return counts / draws


def _entropy(freq):
    nz = freq[freq > 0]
    return float(-(nz * np.log(nz)).sum())


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# --------------------------------------------------------------------- validation

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", 5.01), ("temperature", math.nan),
    ("temperature", "1"), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -1), ("top_k", 2.5), ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", 0.009), ("repetition_penalty", 5.5),
    ("presence_penalty", -2.1), ("presence_penalty", 2.1),
    ("frequency_penalty", -2.01), ("frequency_penalty", math.inf),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0),
    ("stop", ("",)), ("stop", tuple(str(i) for i in range(17))), ("stop", (1,)),
    ("stop_token_ids", (-1,)), ("stop_token_ids", ("a",)),
    ("ignore_eos", "yes"), ("n", 0), ("n", 5), ("logprobs", 1),
    ("top_logprobs", 21), ("top_logprobs", -1), ("json_schema", "object"),
    ("json_object", "true"),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_out_of_range_names_the_field(field, value):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cross_field_errors_name_the_field():
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(top_logprobs=3)
    assert info.value.param == "top_logprobs" and "logprobs" in str(info.value)
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(json_schema={"type": "object"}, json_object=True)
    assert info.value.param == "json_schema"


def test_boundaries_are_accepted():
    SamplingParams(temperature=0, top_p=1, min_p=0, repetition_penalty=0.01,
                   presence_penalty=-2, frequency_penalty=2, seed=0, n=4, top_k=0)
    SamplingParams(temperature=5, min_p=1, repetition_penalty=5, seed=2**63 - 1,
                   logprobs=True, top_logprobs=20, max_tokens=1,
                   stop=tuple(f"s{i}" for i in range(16)), stop_token_ids=(0, 7))


def test_normalisation_defaults_and_immutability():
    params = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert params.stop == ("###",) and params.stop_token_ids == (3, 4)
    built = SamplingParams.with_defaults(temperature=None, top_p=0.5, seed=None)
    assert built.temperature == 1.0 and built.top_p == 0.5 and built.seed is None
    assert SamplingParams().max_tokens == 256
    with pytest.raises(TypeError):
        SamplingParams.with_defaults(temprature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.3
    with pytest.raises(InvalidParameterError) as info:
        params.replace(top_k=-1)
    assert info.value.param == "top_k"


def test_every_field_has_a_docstring_line():
    import inspect

    import toolkit.runtime.sampling_params as module

    source = inspect.getsource(module.SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        after = source.split(f"    {f.name}:", 1)[1].splitlines()[1].strip()
        assert after.startswith('"""'), f.name


# --------------------------------------------------------------------- distributions

def test_temperature_one_matches_softmax_and_orders_entropy():
    logits = _logits([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    freq = {t: _empirical(SamplingParams(temperature=t, seed=1), logits) for t in (0.5, 1.0, 2.0)}
    assert np.abs(freq[1.0] - _softmax(logits)).max() < 0.03
    assert np.abs(freq[2.0] - _softmax(logits / 2)).max() < 0.03
    assert _entropy(freq[0.5]) < _entropy(freq[1.0]) - 0.1
    assert _entropy(freq[2.0]) > _entropy(freq[1.0]) + 0.1


def test_greedy_is_argmax_and_ignores_the_rng():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50_000).astype(np.float32)
    sampler = SequenceSampler(SamplingParams(temperature=0))
    assert sampler.is_plain_greedy
    assert {sampler.sample(logits, []).token_id for _ in range(20)} == {int(logits.argmax())}
    batch = rng.standard_normal((3, 1000)).astype(np.float32)
    assert greedy_tokens(batch).tolist() == batch.argmax(axis=1).tolist()


@pytest.mark.parametrize("changes", [{}, {"logit_bias": {7: 5.0}}, {"repetition_penalty": 1.3},
                                     {"frequency_penalty": 0.5}, {"min_tokens": 2}, {"temperature": 0.7, "seed": 1}])
def test_a_known_argmax_is_taken_only_for_the_row_as_it_came(changes):
    """``sample(argmax=...)``: the runner's argmax of the raw row (the int8 LM head kernel's) stands for
    ``np.argmax`` only where greedy picks from that very row; a bias, a penalty or a banned stop token
    changes the row, and sampling draws, so there the hint is not used. A deliberately wrong hint
    (id 3, not the row's argmax) shows which path ran."""
    logits = np.zeros(50, np.float32)
    logits[[7, 9, 0]] = [2.0, 1.5, 3.0]  # argmax 0, the stop token banned by min_tokens below
    params = SamplingParams(**{"temperature": 0, **changes})
    sampler = SequenceSampler(params)
    got = sampler.sample(logits, [9], banned=(0,) if params.min_tokens else (), argmax=3).token_id
    unhinted = SequenceSampler(params).sample(logits, [9], banned=(0,) if params.min_tokens else ()).token_id
    if not changes:
        assert got == 3 and unhinted == 0  # the hint was taken as is
    else:
        assert got == unhinted != 3


@pytest.mark.parametrize("vocab", [6, 50_000])
def test_top_k_never_leaves_the_top_k(vocab):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(vocab) * 0.3).astype(np.float32)
    top2 = np.argsort(-logits)[:2]
    logits[top2] += 0.5
    freq = _empirical(SamplingParams(top_k=2, seed=5), logits)
    assert set(np.flatnonzero(freq)) == set(top2.tolist())
    expected = _softmax(logits[top2])
    assert np.abs(freq[top2] - expected).max() < 0.03


def test_top_p_keeps_the_minimal_nucleus():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    assert set(np.flatnonzero(_empirical(SamplingParams(top_p=0.75, seed=2), logits))) == {0, 1}
    freq = _empirical(SamplingParams(top_p=0.85, seed=2), logits)
    assert set(np.flatnonzero(freq)) == {0, 1, 2}
    assert np.abs(freq[:3] - np.array([0.5, 0.3, 0.15]) / 0.95).max() < 0.03
    assert set(np.flatnonzero(_empirical(SamplingParams(top_p=0.4, seed=2), logits))) == {0}


def _nucleus(logits, top_p):
    probs = _softmax(logits.astype(np.float64))
    order = np.argsort(-probs, kind="stable")
    return set(order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1].tolist())


def test_top_p_large_vocab_exact_nucleus():
    logits = np.full(262_144, -8.0, dtype=np.float32)
    heads = [10, 5000, 131_072, 262_143]
    logits[heads] = [9.0, 8.5, 8.0, 7.5]
    nucleus = _nucleus(logits, 0.85)
    assert nucleus == {10, 5000, 131_072}
    freq = _empirical(SamplingParams(top_p=0.85, seed=4), logits, draws=1500)
    assert set(np.flatnonzero(freq)) == nucleus


def test_top_p_large_vocab_nucleus_reaching_into_a_random_tail():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(262_144) - 4.0).astype(np.float32)
    logits[[3, 77_777]] = [9.0, 8.0]
    nucleus = _nucleus(logits, 0.9)
    assert 10 < len(nucleus) < 262_144
    sampled = set(np.flatnonzero(_empirical(SamplingParams(top_p=0.9, seed=6), logits, 1500)))
    assert sampled <= nucleus
    assert sampled - {3, 77_777}


def _reference_nucleus(z, top_p):
    p = np.exp(z - z.max())
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order], dtype=np.float64)
    return order[: int(np.searchsorted(cum, p.sum(dtype=np.float64) * top_p)) + 1]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("shape", ["flat_tail", "peaked", "small", "ties"])
def test_top_p_filter_equals_full_stable_sort(shape, top_p):
    rng = np.random.default_rng(len(shape))
    if shape == "small":
        z = rng.standard_normal(500).astype(np.float32)
    elif shape == "ties":
        z = np.repeat(rng.standard_normal(64), 4096).astype(np.float32)
    else:
        z = (rng.standard_normal(262_144) * (1.0 if shape == "flat_tail" else 2.5)).astype(np.float32)
        z[12_345] += 9.0 if shape == "peaked" else 0.0
    ids, kept = _top_p_filter(None, z, top_p)
    expected = _reference_nucleus(z, top_p)
    assert sorted(ids.tolist()) == sorted(expected.tolist())
    np.testing.assert_array_equal(kept, z[ids])


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    assert set(np.flatnonzero(_empirical(SamplingParams(min_p=0.2, seed=3), logits))) == {0, 1, 2}
    assert set(np.flatnonzero(_empirical(SamplingParams(min_p=0.5, seed=3), logits))) == {0, 1}


def test_temperature_is_applied_before_top_p():
    logits = _logits([0.6, 0.3, 0.07, 0.03])
    cold = _empirical(SamplingParams(top_p=0.85, temperature=1.0, seed=1), logits)
    hot = _empirical(SamplingParams(top_p=0.85, temperature=3.0, seed=1), logits)
    assert set(np.flatnonzero(cold)) == {0, 1}
    assert set(np.flatnonzero(hot)) == {0, 1, 2}


def test_block_draw_spans_the_whole_vocab_and_never_picks_zero_mass():
    logits = np.full(262_144, -np.inf, dtype=np.float32)
    ids = [0, 1023, 1024, 100_000, 262_143]
    logits[ids] = 0.0
    freq = _empirical(SamplingParams(seed=9), logits, draws=3000)
    assert set(np.flatnonzero(freq)) == set(ids)
    assert np.abs(freq[ids] - 0.2).max() < 0.04


@pytest.mark.parametrize("k", [1, 5, 64, 1000])
def test_top_k_indices_exact(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal(262_144).astype(np.float32)
    assert set(top_k_indices(x, k).tolist()) == set(np.argsort(-x)[:k].tolist())
    masked = np.full_like(x, -np.inf)
    masked[[7, 70_000, 200_000]] = [1.0, 3.0, 2.0]
    if k >= 3:
        assert {7, 70_000, 200_000} <= set(top_k_indices(masked, k).tolist())
    assert sample_token(masked, 1.0, k, 1.0, 0.0, 0.999) in {7, 70_000, 200_000}


# --------------------------------------------------------------------- penalties

def test_repetition_penalty_exact_ctrl_rule():
    logits = np.array([2.0, -1.0, 0.5, -0.5, 3.0], dtype=np.float32)
    sampler = SequenceSampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1, 0])
    out = sampler.process(logits, [2, 2])
    np.testing.assert_allclose(out, [1.0, -2.0, 0.25, -0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, -0.5, 3.0])  # caller row untouched


def test_repetition_penalty_lowers_sampled_probability_by_exact_factor():
    logits = np.array([1.0, 1.0], dtype=np.float32)
    freq = _empirical(SamplingParams(repetition_penalty=2.0, seed=8), logits, prompt_ids=[0])
    expected = 1.0 / (1.0 + math.exp(0.5))  # logit 1.0 -> 0.5
    assert abs(freq[0] - expected) < 0.025


def test_presence_and_frequency_exact_additive_amounts():
    logits = np.zeros(10, dtype=np.float32)
    sampler = SequenceSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                              prompt_ids=[7])
    out = sampler.process(logits, [3, 3, 3, 5])
    expected = np.zeros(10)
    expected[3] = -(0.5 + 3 * 0.25)
    expected[5] = -(0.5 + 0.25)
    np.testing.assert_allclose(out, expected)
    out = sampler.process(logits, [3, 3, 3, 5, 5, 9])  # incremental update
    expected[5], expected[9] = -(0.5 + 0.5), -0.75
    np.testing.assert_allclose(out, expected)
    out = sampler.process(logits, [9])  # shorter list (recomputed sequence): rebuilt
    np.testing.assert_allclose(out, np.where(np.arange(10) == 9, -0.75, 0.0))


def test_negative_presence_penalty_encourages_repeats():
    logits = np.zeros(4, dtype=np.float32)
    sampler = SequenceSampler(SamplingParams(presence_penalty=-2.0, temperature=0))
    assert sampler.sample(logits, [2]).token_id == 2


# --------------------------------------------------------------------- seeds

def _run(sampler, steps_logits):
    out = []
    for row in steps_logits:
        out.append(sampler.sample(row, out).token_id)
    return out


def _steps(n=40, vocab=32_000):
    rng = np.random.default_rng(123)
    return [rng.standard_normal(vocab).astype(np.float32) for _ in range(n)]


def test_same_seed_same_tokens_different_seed_differs():
    steps = _steps()
    params = SamplingParams(seed=42, top_k=50, top_p=0.95, temperature=1.5)
    first = _run(SequenceSampler(params), steps)
    assert _run(SequenceSampler(params), steps) == first
    assert _run(SequenceSampler(params.replace(seed=43)), steps) != first
    assert _run(SequenceSampler(params, choice_index=1), steps) != first


def test_seed_is_independent_of_interleaved_samplers():
    steps = _steps()
    params = SamplingParams(seed=7, temperature=1.2)
    alone = _run(SequenceSampler(params), steps)
    mine = SequenceSampler(params)
    others = [SequenceSampler(SamplingParams(seed=s, temperature=0.9)) for s in (7, 8, None)]
    outputs = [[] for _ in range(4)]
    for row in steps:
        for sampler, out in zip(others + [mine], outputs):
            out.append(sampler.sample(row * 1.1, out).token_id if sampler is not mine
                       else sampler.sample(row, out).token_id)
    assert outputs[3] == alone


def test_unseeded_samplers_differ():
    steps = _steps(n=20)
    params = SamplingParams(temperature=2.0)
    assert _run(SequenceSampler(params), steps) != _run(SequenceSampler(params), steps)


# --------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_model_logprobs():
    rng = np.random.default_rng(11)
    logits = rng.standard_normal(20_000).astype(np.float32) * 2
    params = SamplingParams(logprobs=True, top_logprobs=5, temperature=0.7, top_k=10,
                            repetition_penalty=1.5, seed=1)
    result = SequenceSampler(params, prompt_ids=[0, 1]).sample(logits, [2])
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert result.logprob == pytest.approx(ref[result.token_id], abs=1e-4)
    order = np.argsort(-ref)[:5]
    assert [t for t, _ in result.top_logprobs] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in result.top_logprobs], ref[order], atol=1e-4)
    lp, top = raw_logprobs(logits, int(order[0]))
    assert top == [] and lp == pytest.approx(ref[order[0]], abs=1e-4)


def test_no_logprobs_unless_asked():
    result = SequenceSampler(SamplingParams(seed=0)).sample(np.zeros(8, np.float32), [])
    assert result.logprob is None and result.top_logprobs == []


def test_json_params_need_a_constraint_factory():
    with pytest.raises(ValueError):
        SequenceSampler(SamplingParams(json_object=True))
