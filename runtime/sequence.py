"""Per-request and per-choice state the engine loop works on, and the factory that creates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from toolkit.runtime.detokenizer import PREFIX_TOKENS, IncrementalDetokenizer
from toolkit.runtime.sampler import SequenceSampler
from toolkit.runtime.types import ChoiceDelta, GenerateRequest


@dataclass
class Sequence:
    """One choice of a request: its sampler, detokenizer and generated tokens."""

    seq_id: str
    index: int
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    pending: ChoiceDelta | None = None
    group: Any = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> ChoiceDelta:
        """The choice's not yet delivered output, created on first use."""
        if self.pending is None:
            self.pending = ChoiceDelta(index=self.index, text="", token_ids=[], logprobs=None)
        return self.pending


@dataclass
class SequenceGroup:
    """One request: its prompt, its ``n`` sequences, prefill progress and where outputs go.

    ``deliver`` is called (from the engine thread) with a ``RequestOutput`` or an exception.
    """

    request: GenerateRequest
    sequences: list[Sequence]
    deliver: Callable[[Any], None]
    prefilled: int = 0
    prefill_past: dict[str, np.ndarray] | None = None
    prefill_logits: np.ndarray | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (``usage.prompt_tokens_details.cached_tokens``)."""
    prefix: Any = None
    """The ``PrefixMatch`` pinned from admission until the prefill ends (``runtime/prefix_cache.py``)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def prefill_remaining(self) -> int:
        return len(self.prompt_ids) - self.prefilled

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @property
    def reserved_tokens(self) -> int:
        """KV cache tokens one sequence of this request may need."""
        return len(self.prompt_ids) + self.request.params.max_tokens


class SequenceFactory:
    """Creates a request's group of ``params.n`` sequences; builds the JSON grammar tokenizer once, on first use."""

    def __init__(self, prompts: Any, vocab_size: int = 0):
        self.prompts = prompts
        self.vocab_size = vocab_size or None
        self._json_factory = None

    def _constraints(self):
        if self._json_factory is None:
            from toolkit.runtime.json_constraint import JsonConstraintFactory

            self._json_factory = JsonConstraintFactory(
                self.prompts.tokenizer, eos_token_ids=sorted(self.prompts.eos_ids), vocab_size=self.vocab_size
            )
        return self._json_factory

    def create(self, request: GenerateRequest, deliver: Callable[[Any], None]) -> SequenceGroup:
        """A group of ``params.n`` fresh sequences for ``request``: one sampler and detokenizer per choice."""
        params, prompt_ids = request.params, request.prompt_ids
        factory = self._constraints() if params.needs_json else None
        backend = self.prompts.tokenizer.backend_tokenizer
        sequences = [
            Sequence(
                seq_id=f"{request.request_id}:{index}",
                index=index,
                sampler=SequenceSampler(params, prompt_ids, constraint_factory=factory, choice_index=index),
                detok=IncrementalDetokenizer(backend, stop=params.stop, skip_special_tokens=params.skip_special_tokens,
                                             prefix_ids=prompt_ids[-PREFIX_TOKENS:]),
            )
            for index in range(params.n)
        ]
        group = SequenceGroup(request=request, sequences=sequences, deliver=deliver)
        for seq in sequences:
            seq.group = group
        return group
