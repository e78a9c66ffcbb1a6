"""JSON-constrained decoding (llguidance) driven by random logits through SequenceSampler."""

import json

import jsonschema
import numpy as np
import pytest
from tiny_models import build_byte_fallback_tokenizer
from toolkit.runtime.json_constraint import JsonConstraint, JsonConstraintFactory
from toolkit.runtime.sampler import SequenceSampler
from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

EOS = 1
MERGES = [("{", "\""), ("\"", ":"), ("t", "r"), ("tr", "u"), ("tru", "e"), ("n", "a"),
          ("na", "m"), ("nam", "e"), ("▁", "\""), ("\"", "}"), ("h", "e"), ("l", "l")]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "中"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-fallback BPE: printable ASCII, a few merges, everything else as <0xNN> bytes."""
    return build_byte_fallback_tokenizer(MERGES)


@pytest.fixture(scope="module")
def factory(tokenizer):
    return JsonConstraintFactory(tokenizer, eos_token_ids=[EOS])


def _generate(tokenizer, factory, params, bias=None, vocab=None, steps=200):
    """Sample until EOS with random logits; return (text, sampler, eos_reached)."""
    sampler = SequenceSampler(params, constraint_factory=factory)
    rng = np.random.default_rng(params.seed)
    size = vocab or tokenizer.get_vocab_size()
    out = []
    for _ in range(steps):
        logits = rng.standard_normal(size).astype(np.float32) * 2
        if bias is not None and len(out) > 10:
            logits[bias] += 6.0
        token = sampler.sample(logits, out).token_id
        if token == EOS:
            return tokenizer.decode(out), sampler, True
        out.append(token)
    return tokenizer.decode(out), sampler, False


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_schema_output_parses_and_validates(tokenizer, factory, seed, temperature):
    params = SamplingParams(seed=seed, temperature=temperature, json_schema=SCHEMA)
    text, sampler, finished = _generate(tokenizer, factory, params)
    assert finished, text
    assert sampler.constraint.is_finished()
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_json_object_mode_gives_an_object(tokenizer, factory, seed):
    closers = [tokenizer.token_to_id(c) for c in ('"', "}", "]", "1")]
    params = SamplingParams(seed=seed, json_object=True, top_k=40)
    text, _, finished = _generate(tokenizer, factory, params, bias=closers)
    assert finished, text
    assert isinstance(json.loads(text), dict)


def test_eos_only_when_json_is_complete(tokenizer, factory):
    constraint = factory(SamplingParams(json_schema=SCHEMA))
    prefix = '{"name": "x", "age": 7, "ok": true'
    for token in tokenizer.encode(prefix).ids:
        assert not constraint.allowed_tokens()[EOS]
        assert constraint.accept(token)
    allowed = constraint.allowed_tokens()
    assert not allowed[EOS] and allowed[tokenizer.token_to_id("}")]
    assert constraint.accept(tokenizer.token_to_id("}"))
    allowed = constraint.allowed_tokens()[: tokenizer.get_vocab_size()]
    assert constraint.is_finished() and np.flatnonzero(allowed).tolist() == [EOS]


def test_mask_logits_in_place_and_padded_vocab(tokenizer, factory):
    constraint = factory(SamplingParams(json_object=True))
    logits = np.zeros(tokenizer.get_vocab_size() + 100, dtype=np.float32)
    constraint.mask_logits(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert tokenizer.token_to_id("{") in allowed and EOS not in allowed
    assert not np.isfinite(logits[tokenizer.get_vocab_size():]).any()
    assert all(tokenizer.decode([int(t)]).startswith(("{", " ", "\n", "\t")) or
               tokenizer.decode([int(t)]) == "" for t in allowed)


def test_illegal_token_leaves_only_eos(tokenizer, factory):
    constraint = factory(SamplingParams(json_object=True))
    assert not constraint.accept(tokenizer.token_to_id("x"))
    assert constraint.error
    assert np.flatnonzero(constraint.allowed_tokens()).tolist() == [EOS]


def test_invalid_schema_is_a_parameter_error(factory):
    with pytest.raises(InvalidParameterError) as info:
        factory(SamplingParams(json_schema={"type": "no-such-type"}))
    assert info.value.param == "json_schema"


def test_constraint_from_hf_style_wrapper(tokenizer):
    class Wrapper:
        backend_tokenizer = tokenizer
        eos_token_id = EOS

    made = JsonConstraintFactory(Wrapper())
    assert made.eos_token_ids == [EOS]
    assert isinstance(made(SamplingParams(json_object=True)), JsonConstraint)
