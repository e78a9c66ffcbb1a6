"""IncrementalDetokenizer / StopStringMatcher with a tiny byte-fallback BPE tokenizer."""

import random

import pytest
from tiny_models import build_byte_fallback_tokenizer

from toolkit.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher

EOS = 1
MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("l", "l"), ("he", "ll"), ("hell", "o"),
          ("S", "T"), ("O", "P"), ("ST", "OP"), ("▁", "w"), ("o", "r"), ("▁w", "or"),
          ("l", "d"), ("▁wor", "ld")]


@pytest.fixture(scope="module")
def tokenizer():
    """Gemma-style: byte fallback for anything outside printable ASCII (emoji, CJK)."""
    return build_byte_fallback_tokenizer(MERGES)


def _stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    outs = [detok.push(i) for i in ids]
    return detok, outs, detok.flush()


def test_fixture_really_splits_characters_across_byte_tokens(tokenizer):
    tokens = tokenizer.encode("a😀中").tokens
    assert tokens[1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0xE4>", "<0xB8>", "<0xAD>"]
    assert tokenizer.encode("hello world").tokens == ["hello", "▁world"]


@pytest.mark.parametrize("text", ["hello world 😀 中文 the end", "😀😀🎉", "中", "x é ü ß",
                                  "ab\U0001F600cd\u4e2d\u6587ef"])
def test_no_replacement_char_and_deltas_join_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text).ids
    detok, outs, tail = _stream(tokenizer, ids + [EOS])
    assert all("\ufffd" not in o.text_delta for o in outs)
    assert "".join(o.text_delta for o in outs) + tail.text_delta == tokenizer.decode(ids) == text
    assert detok.text == text
    assert not any(o.stopped for o in outs)


def test_random_texts_round_trip(tokenizer):
    rng = random.Random(0)
    alphabet = list("abcdehlorSTOPw ,.{}\"") + ["😀", "中", "é", "🎉", "\u0394"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text).ids
        _, outs, tail = _stream(tokenizer, ids)
        deltas = [o.text_delta for o in outs] + [tail.text_delta]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids)


def test_partial_character_waits_then_arrives_whole(tokenizer):
    ids = tokenizer.encode("a😀").ids
    _, outs, _ = _stream(tokenizer, ids)
    assert [o.text_delta for o in outs] == ["a", "", "", "", "😀"]


def test_character_cut_off_at_the_end_is_dropped_not_replaced(tokenizer):
    ids = tokenizer.encode("ok😀").ids[:-1]
    detok, outs, tail = _stream(tokenizer, ids)
    assert "".join(o.text_delta for o in outs) + tail.text_delta == "ok"
    assert "\ufffd" in tokenizer.decode(ids)


def _check_stop_stream(tokenizer, text, stops, expected, reason):
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, stop=stops)
    emitted = ""
    for i in ids:
        out = detok.push(i)
        emitted += out.text_delta
        assert expected.startswith(emitted), (emitted, expected)
        assert not any(s in emitted for s in stops)
        if out.stopped:
            break
    emitted += detok.flush().text_delta
    assert emitted == expected
    assert detok.stopped == (reason is not None)
    return detok


def test_stop_string_spanning_tokens_is_never_emitted(tokenizer):
    # "hello" + " world": the stop "lo wo" spans the two tokens.
    detok = _check_stop_stream(tokenizer, "the hello world STOP", ["lo wo"], "the hel", "lo wo")
    assert detok.push(tokenizer.token_to_id("STOP")).text_delta == ""


def test_stop_string_across_byte_tokens(tokenizer):
    _check_stop_stream(tokenizer, "ab😀中cd", ["😀中"], "ab", "😀中")
    _check_stop_stream(tokenizer, "ab😀中cd", ["中c"], "ab😀", "中c")


def test_stop_inside_one_token_and_earliest_of_several(tokenizer):
    _check_stop_stream(tokenizer, "hello world", ["ll"], "he", "ll")
    detok = _check_stop_stream(tokenizer, "hello world", ["world", "o w"], "hell", "o w")
    assert detok.flush().stop_reason == "o w"
    # "ll" completes before "hello" does, although "hello" starts earlier
    _check_stop_stream(tokenizer, "the hello", ["hello", "ll"], "the he", "ll")


def test_text_after_stop_is_not_emitted(tokenizer):
    ids = tokenizer.encode("hello STOP world").ids
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    outs = [detok.push(i) for i in ids]
    first = next(k for k, o in enumerate(outs) if o.stopped)
    assert all(o.stopped and o.text_delta == "" for o in outs[first + 1:])
    assert outs[first].stop_reason == "STOP"
    assert detok.text == "hello " and detok.flush().text_delta == ""


def test_held_back_text_that_is_not_a_stop_is_flushed(tokenizer):
    detok = _check_stop_stream(tokenizer, "hello STOP", ["STOPX"], "hello STOP", None)
    assert detok.text == "hello STOP"
    ids = tokenizer.encode("STOP world").ids
    detok = IncrementalDetokenizer(tokenizer, stop=["STOPX"])
    assert detok.push(ids[0]).text_delta == ""  # "STOP" could start "STOPX"
    assert detok.push(ids[1]).text_delta == "STOP world"


def test_special_tokens_skipped_and_prefix_not_emitted(tokenizer):
    _, outs, _ = _stream(tokenizer, [tokenizer.token_to_id("hello"), EOS])
    assert [o.text_delta for o in outs] == ["hello", ""]
    detok = IncrementalDetokenizer(tokenizer, prefix_ids=tokenizer.encode("the").ids)
    assert detok.push(tokenizer.token_to_id("▁world")).text_delta == " world"


def _reference_stop(text, stops):
    """The stop that completes first (the longer one on a tie), as (start, stop)."""
    for end in range(1, len(text) + 1):
        ending = sorted((s for s in stops if text[:end].endswith(s)), key=len, reverse=True)
        if ending:
            return end - len(ending[0]), ending[0]
    return None


def test_stop_matcher_against_reference_on_random_streams():
    rng = random.Random(1)
    for _ in range(2000):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 12)))
        matcher, emitted, fed, pieces = StopStringMatcher(stops), "", 0, []
        while fed < len(text):
            step = rng.randint(1, 3)
            pieces.append(text[fed:fed + step])
            fed += step
        for piece in pieces:
            out = matcher.feed(piece)
            emitted += out.text_delta
            if out.stopped:
                break
            held = matcher.held_back
            assert not held or any(s.startswith(held) and s != held for s in stops)
        emitted += matcher.flush()
        hit = _reference_stop(text, stops)
        assert emitted == (text if hit is None else text[: hit[0]])
        assert matcher.stopped == (hit is not None)
        assert matcher.stop_reason == (None if hit is None else hit[1])


def test_stop_matcher_rejects_empty_stop():
    with pytest.raises(ValueError):
        StopStringMatcher([""])
