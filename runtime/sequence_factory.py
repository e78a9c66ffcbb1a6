"""Build a request's ``SequenceGroup``: one sampler and detokenizer per choice."""

from __future__ import annotations

from typing import Any, Callable

from toolkit.runtime.detokenizer import IncrementalDetokenizer
from toolkit.runtime.prompting import PromptBuilder
from toolkit.runtime.sampler import SequenceSampler
from toolkit.runtime.sequence import Sequence, SequenceGroup
from toolkit.runtime.types import GenerateRequest

PREFIX_TOKENS = 4


class SequenceFactory:
    """Creates sequence groups; builds the JSON grammar tokenizer once, on first use."""

    def __init__(self, prompts: PromptBuilder, vocab_size: int = 0):
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

    def create(self, request: GenerateRequest, prompt_ids: list[int], deliver: Callable[[Any], None]) -> SequenceGroup:
        """A group of ``params.n`` fresh sequences for ``request``."""
        params = request.params
        factory = self._constraints() if params.needs_json else None
        backend = self.prompts.tokenizer.backend_tokenizer
        sequences = [
            Sequence(
                seq_id=f"{request.request_id}:{index}",
                index=index,
                sampler=SequenceSampler(params, prompt_ids, constraint_factory=factory, choice_index=index),
                detok=IncrementalDetokenizer(backend, stop=params.stop, prefix_ids=prompt_ids[-PREFIX_TOKENS:]),
            )
            for index in range(params.n)
        ]
        group = SequenceGroup(request=request, prompt_ids=prompt_ids, sequences=sequences, deliver=deliver)
        for seq in sequences:
            seq.group = group
        return group
