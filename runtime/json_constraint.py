"""JSON-constrained decoding with llguidance (numpy only, no torch).

Build one :class:`JsonConstraintFactory` per model (converting the tokenizer takes about a
second) and pass it to ``SequenceSampler(constraint_factory=...)``; each request that asks
for ``json_schema`` / ``json_object`` gets its own :class:`JsonConstraint`.

EOS is allowed by the grammar only where the JSON document is complete; once it cannot be
extended any further, EOS is the only allowed token.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np

from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

log = logging.getLogger(__name__)

ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (registers the submodule)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("JSON mode needs the 'llguidance>=1.9,<2' package") from exc
    return llguidance


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind an HF fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _eos_ids(tokenizer: Any, eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        eos_token_ids = getattr(tokenizer, "eos_token_id", None)
    if eos_token_ids is None:
        raise ValueError("eos_token_ids is required for a tokenizer without eos_token_id")
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(t) for t in eos_token_ids]


class JsonConstraintFactory:
    """Holds the llguidance tokenizer of one model and makes per-request constraints."""

    def __init__(self, tokenizer: Any, eos_token_ids: int | Iterable[int] | None = None,
                 vocab_size: int | None = None, whitespace_flexible: bool = False) -> None:
        """``tokenizer``: an HF fast tokenizer or a ``tokenizers.Tokenizer``.

        ``eos_token_ids``: the ids that end generation (e.g. Gemma's ``<eos>`` and
        ``<end_of_turn>``); defaults to ``tokenizer.eos_token_id``. ``vocab_size``: the
        model's logits width when it exceeds the tokenizer's (padded embeddings).
        ``whitespace_flexible``: allow any whitespace between JSON tokens; off by default
        because small models can loop on newlines; separators are then ``", "`` and ``": "``.
        """
        llg = _llguidance()
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(_backend(tokenizer).to_str())
        backend.no_padding()
        backend.no_truncation()
        self.eos_token_ids = _eos_ids(tokenizer, eos_token_ids)
        self.ll_tokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                            eos_token=self.eos_token_ids,
                                            slices=llg.LLTokenizer.json_slices())
        self.compile_options: dict[str, Any] = (
            {"whitespace_flexible": True} if whitespace_flexible else
            {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})

    def grammar(self, schema: Mapping[str, Any] | None) -> str:
        """llguidance grammar for ``schema`` (any JSON object when None)."""
        llg = _llguidance()
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                dict(schema if schema is not None else ANY_OBJECT_SCHEMA),
                defaults=self.compile_options)
        except ValueError as exc:
            raise InvalidParameterError("json_schema", f"invalid json_schema: {exc}") from exc

    def __call__(self, params: SamplingParams) -> "JsonConstraint":
        """The constraint for one sequence of a request with ``params.needs_json``."""
        return JsonConstraint(self.ll_tokenizer, self.grammar(params.json_schema))


class JsonConstraint:
    """Grammar state of one sequence: masks logits and follows the chosen tokens."""

    def __init__(self, ll_tokenizer: Any, grammar: str) -> None:
        """``ll_tokenizer``: a ``llguidance.LLTokenizer``; ``grammar``: an llguidance grammar."""
        llg = _llguidance()
        self._llg = llg
        self._matcher = llg.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidParameterError(
                "json_schema", f"unsupported json_schema: {self._matcher.get_error()}")
        self._eos = list(ll_tokenizer.eos_tokens)
        self._bitmask = llg.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)

    def allowed_tokens(self) -> np.ndarray:
        """Boolean vector over the tokenizer vocabulary: which tokens may come next."""
        if self._matcher.is_error():
            allowed = np.zeros(self._bitmask.size * 32, dtype=bool)
            allowed[self._eos] = True
            return allowed
        self._llg.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        return np.unpackbits(self._bitmask.view(np.uint8).ravel(), bitorder="little").view(bool)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logits of disallowed tokens (and of ids past the vocabulary) to -inf."""
        allowed = self.allowed_tokens()
        n = min(logits.shape[-1], allowed.size)
        np.copyto(logits[..., :n], -np.inf, where=~allowed[:n])
        logits[..., n:] = -np.inf

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and EOS-only from now on) if it was illegal."""
        ok = self._matcher.consume_token(int(token_id))
        if not ok:
            log.warning("JSON constraint rejected token %d: %s", token_id,
                        self._matcher.get_error())
        return ok

    def is_finished(self) -> bool:
        """True when the document is complete and cannot be extended (only EOS remains)."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the text so far is a complete document (EOS is allowed now)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        """The matcher's error message, empty when healthy."""
        return self._matcher.get_error()
