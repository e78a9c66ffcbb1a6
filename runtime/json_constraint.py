"""JSON-constrained decoding with llguidance (numpy only, no torch).

Build one :class:`JsonConstraintFactory` per model (converting the tokenizer takes about a
second) and pass it to ``SequenceSampler(constraint_factory=...)``; each request that asks
for ``json_schema`` / ``json_object`` gets its own :class:`JsonConstraint`.

EOS is allowed by the grammar only where the JSON document is complete; once it cannot be
extended any further, EOS is the only allowed token.

**Budget steering** (:meth:`JsonConstraint.fit_budget`): the sampler passes each step's budget,
the tokens still allowed by ``max_tokens`` and the context. The closing cost of a grammar state
is the length of a short path to an accepting state, found greedily on a copy of the matcher:
take the forced (fast-forward) tokens, else the first valid token of a fixed list of closers
(``"}``, ``"``, ``}``, ``]``, ``0``, ``[]``, ...). The sampled token is kept when the cost of the
state it leads to still fits in the budget left after it; otherwise it is replaced by the most
likely (by the processed logits) of the closers, forced tokens and model's top choices that do
fit, and the constraint records that it was ``steered``. So the value is complete JSON, valid
against the schema, when the budget ends, provided the budget at the first step covers the
shortest document (a schema whose required properties need more tokens than ``max_tokens``
cannot be closed in time).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np

from toolkit.runtime.sampling_params import InvalidParameterError, SamplingParams

log = logging.getLogger(__name__)

ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# Tried in this order when looking for a short way to close a JSON value (only strings that
# are one token are used). Inside a string: close it (and its container if possible) before
# anything else, since every other character would only extend it. Elsewhere: closers of
# containers, the shortest values, separators, then openers and characters that satisfy
# minLength/minimum-style constraints.
IN_STRING_CLOSERS = ('"}', '"]', '"', '}', ']', '0', 'a', '1', ' ', 'A', '_', '.', '-', 'e')
STRUCTURE_CLOSERS = ('}}', ']}', '}]', '}', ']', '""', '0', '[]', '{}', 'true', 'null', ',', ':',
                     ' ', '"', '1', '2', '3', '4', '5', '6', '7', '8', '9', '[', '{', '-', '.',
                     'e', 'a', 'A', '_')
MAX_CLOSING_TOKENS = 256  # a closing path longer than this counts as "cannot close"
_TOP_CHOICES = 8  # the model's best tokens also offered when steering
#: Closing costs are walked on a copy of the matcher (one step per token of the closing path), so
#: a schema that needs hundreds of tokens to close (``minItems: 100``) made every decode step
#: cost milliseconds per sequence. While the budget left exceeds the last measured closing cost
#: by more than ``_SLACK`` tokens (minus the steps since), the check is skipped, for at most
#: ``_RECHECK_EVERY`` steps: a token would have to add more than that slack to the closing path
#: between two checks for a reply to run out.
_SLACK = 32
_RECHECK_EVERY = 16


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
        self.closing_tokens = (_single_tokens(self.ll_tokenizer, IN_STRING_CLOSERS),
                               _single_tokens(self.ll_tokenizer, STRUCTURE_CLOSERS))
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
        return JsonConstraint(self.ll_tokenizer, self.grammar(params.json_schema), self.closing_tokens)


def _single_tokens(ll_tokenizer: Any, strings: Iterable[str]) -> tuple[int, ...]:
    """The ids of those ``strings`` that are one token, in order, without repeats."""
    out: list[int] = []
    for text in strings:
        ids = ll_tokenizer.tokenize_str(text)
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    return tuple(out)


class _StringState:
    """Whether a JSON text so far ends inside a string (and after a backslash), fed by bytes."""

    __slots__ = ("in_string", "escape")

    def __init__(self, in_string: bool = False, escape: bool = False) -> None:
        self.in_string, self.escape = in_string, escape

    def copy(self) -> "_StringState":
        return _StringState(self.in_string, self.escape)

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.escape:
                self.escape = False
            elif byte == 0x5C and self.in_string:  # backslash
                self.escape = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string


class JsonConstraint:
    """Grammar state of one sequence: masks logits and follows the chosen tokens."""

    def __init__(self, ll_tokenizer: Any, grammar: str,
                 closing_tokens: tuple[Iterable[int], Iterable[int]] = ((), ())) -> None:
        """``ll_tokenizer``: a ``llguidance.LLTokenizer``; ``grammar``: an llguidance grammar;
        ``closing_tokens``: ids tried in order to close the value inside a string and elsewhere
        (see :meth:`closing_path`)."""
        llg = _llguidance()
        self._llg = llg
        self._tokenizer = ll_tokenizer
        self._closing = (tuple(int(t) for t in closing_tokens[0]), tuple(int(t) for t in closing_tokens[1]))
        self._token_bytes: dict[int, bytes] = {}
        self._strings = _StringState()
        self.steered = False  # True once the token budget replaced a sampled token
        self._slack: int | None = None  # budget left minus closing cost at the last check
        self._unchecked = 0  # steps since that check
        self._matcher = llg.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidParameterError(
                "json_schema", f"unsupported json_schema: {self._matcher.get_error()}")
        self._eos = list(ll_tokenizer.eos_tokens)
        self._bitmask = llg.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)

    def allowed_tokens(self) -> np.ndarray:
        """Boolean vector over the tokenizer vocabulary: which tokens may come next."""
        return self._allowed(self._matcher)

    def _allowed(self, matcher: Any) -> np.ndarray:
        if matcher.is_error():
            allowed = np.zeros(self._bitmask.size * 32, dtype=bool)
            allowed[self._eos] = True
            return allowed
        self._llg.numpy.fill_next_token_bitmask(matcher, self._bitmask)
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
        elif int(token_id) not in self._eos:
            self._strings.feed(self._bytes(int(token_id)))
        return ok

    def is_finished(self) -> bool:
        """True when the document is complete and cannot be extended (only EOS remains)."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the text so far is a complete document (EOS is allowed now)."""
        return self._matcher.is_accepting()

    # -- budget steering ----------------------------------------------------------------------
    def _bytes(self, token: int) -> bytes:
        data = self._token_bytes.get(token)
        if data is None:
            data = self._token_bytes[token] = self._tokenizer.decode_bytes([token])
        return data

    def closing_path(self, limit: int = MAX_CLOSING_TOKENS, after: int | None = None) -> list[int] | None:
        """A short token path from the current state (or the state after token ``after``) to a
        complete document: the forced tokens, else the first valid closing token for the place
        (inside a string or not), else the shortest allowed token. None when ``after`` is not
        allowed or no path of at most ``limit`` tokens was found."""
        m, strings = self._matcher.deep_copy(), self._strings.copy()
        if after is not None:
            if m.validate_tokens([after]) != 1:
                return None
            m.consume_token(after)
            strings.feed(self._bytes(after))
        path: list[int] = []
        while not m.is_accepting():
            if m.is_error() or len(path) >= limit:
                return None
            forced = m.compute_ff_tokens()
            token = forced[0] if forced else self._first_valid(m, strings.in_string)
            if token is None or not m.consume_token(token):
                return None
            strings.feed(self._bytes(token))
            path.append(token)
        return path

    def _first_valid(self, m: Any, in_string: bool) -> int | None:
        for token in self._closing[0 if in_string else 1]:
            if m.validate_tokens([token]) == 1:
                return token
        allowed = [int(t) for t in np.flatnonzero(self._allowed(m))[:4096] if int(t) not in self._eos]
        return min(allowed, key=lambda t: (len(self._bytes(t)), t)) if allowed else None

    def closing_cost(self, after: int | None = None, limit: int = MAX_CLOSING_TOKENS) -> int | None:
        """Length of :meth:`closing_path` (None when there is none within ``limit`` tokens)."""
        path = self.closing_path(limit=limit, after=after)
        return None if path is None else len(path)

    def fit_budget(self, token: int, logits: np.ndarray, budget: int | None) -> int:
        """``token`` if the document can still be completed within ``budget`` tokens (this one
        included) after it; else the most likely token (by the masked ``logits``) among the
        closers, the forced token and the model's best choices that keeps it completable, and
        :attr:`steered` becomes True. EOS passes unchanged (it is allowed only when complete)."""
        if budget is None or self._matcher.is_error() or token in self._eos:
            return token
        left = budget - 1
        if left > MAX_CLOSING_TOKENS + _SLACK:  # any closing path we would steer along fits: nothing to check
            return token
        if self._slack is not None and self._unchecked < _RECHECK_EVERY and self._slack - self._unchecked > _SLACK:
            self._unchecked += 1
            return token
        cost = self.closing_cost(after=token, limit=min(MAX_CLOSING_TOKENS, left))
        if cost is not None and cost <= left:
            self._slack, self._unchecked = left - cost, 1
            return token
        self._slack = None
        path = self.closing_path()
        if path is None and cost is None:  # closing needs over MAX_CLOSING_TOKENS even now: nothing to steer to yet
            self._slack, self._unchecked = _SLACK + _RECHECK_EVERY, 1
            return token
        n = logits.shape[-1]
        options = {*self._closing[0], *self._closing[1], *path[:1]} if path else {*self._closing[0], *self._closing[1]}
        if n > _TOP_CHOICES:
            options.update(int(t) for t in np.argpartition(logits, n - _TOP_CHOICES)[n - _TOP_CHOICES:])
        fitting = []
        for option in options:
            if option < n and np.isfinite(logits[option]) and option not in self._eos:
                c = self.closing_cost(after=option, limit=min(MAX_CLOSING_TOKENS, left))
                if c is not None and c <= left:
                    fitting.append(option)
        if fitting:
            choice = max(fitting, key=lambda t: (float(logits[t]), -t))
        elif path:
            choice = path[0]  # the budget is below the shortest document: close as fast as possible
        else:
            return token
        if choice != token:
            self.steered = True
        return int(choice)

    @property
    def error(self) -> str:
        """The matcher's error message, empty when healthy."""
        return self._matcher.get_error()
