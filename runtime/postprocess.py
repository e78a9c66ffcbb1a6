"""After a model step: sample each row, detokenize, decide who finished, and package the deltas."""

from __future__ import annotations

import numpy as np

from toolkit.runtime.prompting import PromptBuilder
from toolkit.runtime.sequence import Sequence, SequenceGroup
from toolkit.runtime.types import RequestOutput, TokenLogprob


class TokenProcessor:
    """Applies one sampled token to a sequence and its pending delta."""

    def __init__(self, prompts: PromptBuilder, context_length: int):
        self.prompts = prompts
        self.context_length = context_length

    def advance_drafted(self, group: SequenceGroup, seq: Sequence, logits_rows: np.ndarray, draft: list[int]) -> list[int]:
        """Apply a verify step: ``logits_rows[j]`` follows draft token ``j`` (row 0 the last emitted token).

        Each position goes through ``advance`` exactly as plain decoding would (sampling, stops,
        max_tokens, logprobs), with the draft token offered to the sampler; the run ends at the
        first token that differs from the draft or when the sequence finishes, so at most
        ``len(draft) + 1`` tokens are emitted and never fewer than one. Returns the emitted tokens.
        """
        emitted = []
        for j in range(len(draft) + 1):
            proposal = draft[j] if j < len(draft) else None
            token = self.advance(group, seq, logits_rows[j], draft=proposal)
            emitted.append(token)
            if seq.finished or token != proposal:
                break
        return emitted

    def remaining(self, group: SequenceGroup, seq: Sequence) -> int:
        """Tokens ``seq`` may still generate (max_tokens and the context window)."""
        return min(group.request.params.max_tokens, self.context_length - len(group.prompt_ids)) - len(seq.output_ids)

    def advance(self, group: SequenceGroup, seq: Sequence, logits_row: np.ndarray, draft: int | None = None,
                argmax: int | None = None) -> int:
        """Sample the next token of ``seq`` from ``logits_row``, apply the stop rules; returns the token.

        ``draft``: a speculated token for this position (``advance_drafted``); ``argmax``: the row's
        argmax where the model runner found it (``SequenceSampler.sample``).
        """
        params = group.request.params
        banned = self.stop_ids(params) if len(seq.output_ids) < params.min_tokens else ()
        budget = self.remaining(group, seq)
        result = seq.sampler.sample(logits_row, seq.output_ids, banned, budget=budget, draft=draft, argmax=argmax)
        token = result.token_id
        seq.output_ids.append(token)
        group.completion_tokens += 1  # the stop token counts: the model generated it (OpenAI, vLLM)
        delta = seq.delta()
        delta.token_ids.append(token)
        stop_token = (token in self.prompts.eos_ids and not params.ignore_eos) or token in params.stop_token_ids
        if params.logprobs and (not stop_token or params.include_stop_str_in_output):
            delta.logprobs = delta.logprobs or []
            delta.logprobs.append(self._logprob(token, result))
        if stop_token:
            if params.include_stop_str_in_output:
                delta.text += seq.detok.push(token).text_delta
            self.finish(seq, "stop")
            return token
        out = seq.detok.push(token)
        delta.text += out.text_delta
        if out.stopped:
            if params.include_stop_str_in_output and out.stop_reason:
                delta.text += out.stop_reason
            self.finish(seq, "stop")
        elif len(seq.output_ids) >= params.max_tokens or len(group.prompt_ids) + len(seq.output_ids) >= self.context_length:
            self.finish(seq, "length")
        elif (constraint := seq.sampler.constraint) is not None and constraint.is_finished():
            self.finish(seq, "stop")
        return token

    def stop_ids(self, params) -> tuple[int, ...]:
        """The token ids that end a sequence of ``params``: EOS (unless ignore_eos) and ``stop_token_ids``."""
        eos = () if params.ignore_eos else tuple(self.prompts.eos_ids)
        return eos + tuple(params.stop_token_ids)

    def _logprob(self, token: int, result) -> TokenLogprob:
        text = self.prompts.token_text
        top = [(tid, text(tid), lp) for tid, lp in result.top_logprobs]
        raw = self.prompts.token_bytes
        return TokenLogprob(
            token_id=token, token=text(token), logprob=result.logprob, top=top,
            token_bytes=raw(token), top_bytes=[raw(tid) for tid, _ in result.top_logprobs],
        )

    @staticmethod
    def finish(seq: Sequence, reason: str) -> None:
        """End ``seq`` with ``reason``, releasing text held back for stop strings.

        A JSON value that the token budget had to close early (``constraint.steered``) ends
        with "length" even though it is complete: the budget, not the model, ended it.
        """
        if getattr(seq.sampler.constraint, "steered", False):
            reason = "length"
        delta = seq.delta()
        delta.text += seq.detok.flush().text_delta
        delta.finish_reason = reason
        seq.finish_reason = reason


def collect_output(group: SequenceGroup) -> RequestOutput | None:
    """The request's pending deltas as one ``RequestOutput`` (None when nothing advanced)."""
    choices = [s.pending for s in group.sequences if s.pending is not None]
    if not choices:
        return None
    for seq in group.sequences:
        seq.pending = None
    return RequestOutput(
        request_id=group.request_id,
        choices=choices,
        prompt_tokens=len(group.prompt_ids),
        completion_tokens=group.completion_tokens,
        finished=group.finished,
    )
