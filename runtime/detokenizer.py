"""Incremental detokenization with stop strings, one instance per sequence.

Two guarantees for streaming clients:

* UTF-8 safety: ``tokenizers.decoders.DecodeStream`` yields nothing until the bytes of a
  character split across byte-fallback tokens (``<0xF0><0x9F><0x98><0x80>``) are complete,
  so no delta ever carries U+FFFD for such a character. A character left incomplete when
  generation ends is dropped by :meth:`IncrementalDetokenizer.flush` rather than sent as
  U+FFFD. Genuinely invalid bytes followed by more text still decode to U+FFFD, exactly
  as a full decode does.
* Stop strings: no part of a stop string is ever emitted, even when it spans tokens. The
  longest suffix of the pending text that could start a stop string is held back until the
  next token settles it; when a stop string completes, the text before it is emitted and
  the sequence is stopped (the stop string and anything after it are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


@dataclass(frozen=True, slots=True)
class DetokOutput:
    """Text to send for one token; ``stop_reason`` is the stop string that ended it."""

    text_delta: str
    stopped: bool = False
    stop_reason: str | None = None


class StopStringMatcher:
    """Filters a stream of text deltas so that it stops before the first stop string."""

    def __init__(self, stop: Iterable[str] = ()) -> None:
        """``stop``: non-empty stop strings."""
        self._stops = tuple(stop)
        if any(not s for s in self._stops):
            raise ValueError("stop strings must be non-empty")
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._pending = ""
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def held_back(self) -> str:
        """Text received but not yet emitted because it may start a stop string."""
        return self._pending

    def feed(self, text: str) -> DetokOutput:
        """Add decoded text; return what is safe to emit now."""
        if self.stopped:
            return DetokOutput("", True, self.stop_reason)
        if not self._stops:
            return DetokOutput(text)
        pending = self._pending + text
        hit = self._earliest_stop(pending)
        if hit is not None:
            index, stop = hit
            self._pending = ""
            self.stopped, self.stop_reason = True, stop
            return DetokOutput(pending[:index], True, stop)
        hold = self._partial_stop_start(pending)
        self._pending = pending[hold:]
        return DetokOutput(pending[:hold])

    def flush(self) -> str:
        """End of generation: the held-back text turned out not to be a stop string."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first (ties: the longer one), and its start.

        Deciding by completion makes the result independent of how text is chunked."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0:
                key = (index + len(stop), index, stop)
                best = key if best is None or key[:2] < best[:2] else best
        return None if best is None else (best[1], best[2])

    def _partial_stop_start(self, text: str) -> int:
        """Start of the longest suffix of ``text`` that is a proper prefix of a stop string
        (``len(text)`` when there is none)."""
        longest = max(len(s) for s in self._stops)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            if text[start] in self._first_chars:
                suffix = text[start:]
                if any(s.startswith(suffix) for s in self._stops):
                    return start
        return len(text)


#: Prompt tokens a detokenizer decodes against (for decoders that strip the first token's leading space).
PREFIX_TOKENS = 4


class IncrementalDetokenizer:
    """Turns the generated token ids of one sequence into safe text deltas."""

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (),
                 skip_special_tokens: bool = True, prefix_ids: Sequence[int] = ()) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` (an HF fast tokenizer's
        ``backend_tokenizer``). ``prefix_ids``: a few prompt tokens to decode against, for
        tokenizers whose decoder strips a leading space from the first token; their text
        is not emitted.
        """
        self._tokenizer = tokenizer
        self._stream = DecodeStream(list(prefix_ids) or None,
                                    skip_special_tokens=skip_special_tokens)
        self._matcher = StopStringMatcher(stop)
        self._emitted: list[str] = []

    @property
    def stopped(self) -> bool:
        """True once a stop string has ended the sequence."""
        return self._matcher.stopped

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def push(self, token_id: int) -> DetokOutput:
        """Decode one more generated token."""
        if self._matcher.stopped:
            return DetokOutput("", True, self._matcher.stop_reason)
        chunk = self._stream.step(self._tokenizer, int(token_id))
        out = self._matcher.feed(chunk or "")
        if out.text_delta:
            self._emitted.append(out.text_delta)
        return out

    def flush(self) -> DetokOutput:
        """End of generation (EOS, stop token, max_tokens): release held-back text."""
        held = self._matcher.flush()
        if held:
            self._emitted.append(held)
        return DetokOutput(held, self._matcher.stopped, self._matcher.stop_reason)
