"""Per-request and per-choice state the engine loop works on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from toolkit.runtime.detokenizer import IncrementalDetokenizer
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
    prompt_ids: list[int]
    sequences: list[Sequence]
    deliver: Callable[[Any], None]
    prefilled: int = 0
    prefill_past: dict[str, np.ndarray] | None = None
    prefill_logits: np.ndarray | None = None
    completion_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

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
