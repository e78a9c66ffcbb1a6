"""``StreamConverter``: TensorRT-LLM's cumulative streamed results → the toolkit's ``RequestOutput`` deltas.

TensorRT-LLM streams one mutated ``RequestOutput`` per request whose ``outputs[i].token_ids`` /
``logprobs`` / ``finish_reason`` grow cumulatively; ``TrtLlmEngine`` (``trtllm_engine.py``) feeds each one to
a ``StreamConverter``, which reads only the new positions and applies the toolkit's own stop rules
(EOS / stop token ids, stop strings through its ``IncrementalDetokenizer``, max_tokens, context length) so
text, logprobs and finish reasons match the ONNX engine. Kept apart from the engine because it is pure
conversion: no TensorRT-LLM import, no asyncio, testable on plain objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from toolkit.runtime.detokenizer import PREFIX_TOKENS, IncrementalDetokenizer
from toolkit.runtime.engines.trtllm_sampling import is_greedy
from toolkit.runtime.types import ChoiceDelta, GenerateRequest, RequestOutput, TokenLogprob

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "abort"}
"""TensorRT-LLM finish reason -> ours; a 'cancelled' the toolkit did not ask for never gets here
(see ``TrtLlmEngine._pump``)."""


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def _rank(entry: Any) -> float:
    rank = getattr(entry, "rank", None)
    return float(rank) if rank is not None else math.inf


@dataclass
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    seen: int = 0
    finish_reason: str | None = None


class StreamConverter:
    """Turns TensorRT-LLM's cumulative streamed results into the toolkit's ``RequestOutput`` deltas.

    Applies the toolkit's stop rules per token (EOS / stop token ids, stop strings, max_tokens,
    context length); a greedy request with ``n > 1`` runs as one sequence copied ``n`` times.
    """

    def __init__(self, request: GenerateRequest, prompts: Any, context_length: int):
        self.request, self.params = request, request.params
        self.prompt_ids, self.prompts, self.context_length = request.prompt_ids, prompts, context_length
        self.copies = self.params.n if is_greedy(self.params) else 1
        backend = prompts.tokenizer.backend_tokenizer
        self.choices = [
            _Choice(i, IncrementalDetokenizer(backend, stop=self.params.stop, prefix_ids=self.prompt_ids[-PREFIX_TOKENS:]))
            for i in range(self.params.n // self.copies)
        ]
        stops = set(self.params.stop_token_ids)
        self.stop_ids = frozenset(stops if self.params.ignore_eos else stops | set(prompts.eos_ids))
        self.completion_tokens = 0

    @property
    def finished(self) -> bool:
        """True once every choice has a finish reason."""
        return all(c.finish_reason is not None for c in self.choices)

    def update(self, result: Any) -> RequestOutput | None:
        """The deltas since the previous call for TensorRT-LLM's (mutated) ``RequestOutput``."""
        deltas = []
        for choice, output in zip(self.choices, result.outputs):
            if choice.finish_reason is None and (delta := self._advance(choice, output)) is not None:
                deltas.append(delta)
        return self._package(deltas)

    def close(self, reason: str) -> RequestOutput | None:
        """Finish every open choice with ``reason`` (the stream ended without saying why)."""
        deltas = []
        for choice in (c for c in self.choices if c.finish_reason is None):
            delta = ChoiceDelta(choice.index, "", [], None)
            self._finish(choice, delta, reason)
            deltas.append(delta)
        return self._package(deltas)

    def _advance(self, choice: _Choice, output: Any) -> ChoiceDelta | None:
        tokens = output.token_ids or []  # cumulative; read by position, never copied
        logprobs = (output.logprobs or []) if self.params.logprobs else None
        upstream_done = output.finish_reason is not None
        end = len(tokens) if logprobs is None or upstream_done else min(len(tokens), len(logprobs))
        delta = ChoiceDelta(choice.index, "", [], [] if self.params.logprobs else None)
        for pos in range(choice.seen, end):
            choice.seen = pos + 1
            if (reason := self._push(choice, delta, tokens[pos], logprobs, pos)) is not None:
                self._finish(choice, delta, reason)
                return delta
        if upstream_done and choice.seen >= len(tokens):
            self._finish(choice, delta, FINISH_REASONS.get(output.finish_reason, "stop"))
        return delta if delta.token_ids or delta.finish_reason else None

    def _push(self, choice: _Choice, delta: ChoiceDelta, token: int, logprobs: list | None, pos: int) -> str | None:
        delta.token_ids.append(int(token))
        self.completion_tokens += self.copies
        if token in self.stop_ids:  # counted, but neither text nor a logprob (as the ONNX engine)
            return "stop"
        if logprobs is not None:
            delta.logprobs.append(self._logprob(int(token), logprobs[pos] if pos < len(logprobs) else None))
        out = choice.detok.push(token)
        delta.text += out.text_delta
        if out.stopped:
            return "stop"
        if choice.seen >= self.params.max_tokens or len(self.prompt_ids) + choice.seen >= self.context_length:
            return "length"
        return None

    def _logprob(self, token: int, entry: Any) -> TokenLogprob:
        """``entry``: TensorRT-LLM's ``{token_id: Logprob(logprob, rank)}`` (top-K + sampled) or a float."""
        text = self.prompts.token_text
        if entry is None or not isinstance(entry, dict):
            return TokenLogprob(token, text(token), math.nan if entry is None else float(entry))
        value = _logprob_value(entry[token]) if token in entry else math.nan
        ranked = sorted(entry.items(), key=lambda kv: (_rank(kv[1]), -_logprob_value(kv[1])))
        top = [(int(t), text(int(t)), _logprob_value(lp)) for t, lp in ranked[: self.params.top_logprobs]]
        return TokenLogprob(token, text(token), value, top)

    @staticmethod
    def _finish(choice: _Choice, delta: ChoiceDelta, reason: str) -> None:
        delta.text += choice.detok.flush().text_delta
        delta.finish_reason = choice.finish_reason = reason

    def _package(self, deltas: list[ChoiceDelta]) -> RequestOutput | None:
        if not deltas:
            return None
        if self.copies > 1:
            deltas = [dataclasses.replace(d, index=i, token_ids=list(d.token_ids),
                                          logprobs=None if d.logprobs is None else list(d.logprobs))
                      for d in deltas for i in range(self.copies)]
        return RequestOutput(self.request.request_id, deltas, len(self.prompt_ids), self.completion_tokens,
                             finished=self.finished)
