"""Per-request sampling parameters, validated once when the request is admitted.

The ranges are the union of what the OpenAI-compatible API (DeepInfra flavour) and the
Workers AI API accept; each API layer may narrow them further (e.g. Workers AI top_k 1..50)
before building a :class:`SamplingParams`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


class InvalidParameterError(ValueError):
    """A sampling parameter has the wrong type or is out of range; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# field -> (low, high, low_inclusive, high_inclusive)
_FLOAT_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "temperature": (0.0, 5.0, True, True),
    "top_p": (0.0, 1.0, False, True),
    "min_p": (0.0, 1.0, True, True),
    "repetition_penalty": (0.01, 5.0, True, True),
    "presence_penalty": (-2.0, 2.0, True, True),
    "frequency_penalty": (-2.0, 2.0, True, True),
}
# field -> (low, high); high None means unbounded
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "max_tokens": (1, None),
    "top_k": (0, None),
    "n": (1, 4),
    "top_logprobs": (0, 20),
    "min_tokens": (0, None),
}
_BOOL_FIELDS = ("ignore_eos", "logprobs", "json_object", "include_stop_str_in_output", "skip_special_tokens")
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence and when to stop it."""

    max_tokens: int = 256
    """Maximum number of generated tokens (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature in [0, 5]; 0 (anything below 1e-5) means greedy argmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with mass >= top_p, in (0, 1]."""
    top_k: int = 0
    """Keep only the top_k most likely tokens (>= 0); 0 disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p * max probability, in [0, 1]."""
    repetition_penalty: float = 1.0
    """CTRL/HF multiplicative penalty in [0.01, 5] over prompt+output tokens: positive
    logits are divided by it, negative logits multiplied; 1 disables it."""
    presence_penalty: float = 0.0
    """OpenAI additive penalty in [-2, 2], subtracted once from every token already output."""
    frequency_penalty: float = 0.0
    """OpenAI additive penalty in [-2, 2], subtracted per occurrence in the output."""
    seed: int | None = None
    """Seed of this request's private RNG in [0, 2**63-1]; None draws a random one."""
    stop: tuple[str, ...] = ()
    """Up to 16 non-empty stop strings; the text stops before the first one (excluded)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids (>= 0) that end generation like EOS."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    n: int = 1
    """Number of choices to generate for the request, 1..4."""
    logprobs: bool = False
    """Return the log probability of each generated token."""
    top_logprobs: int = 0
    """Also return the 0..20 most likely alternatives per position; needs logprobs."""
    json_schema: dict[str, Any] | None = None
    """Constrain the output to JSON valid against this schema."""
    json_object: bool = False
    """Constrain the output to any JSON object."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> bias in [-100, 100] added to the raw logits before penalties and sampling
    (OpenAI's semantics: -100 bans a token, +100 all but forces it)."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` are banned until this many tokens were generated (vLLM)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string (or the stop token's text) that ended the sequence in the text (vLLM)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text (vLLM; False shows e.g. ``<start_of_turn>``)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None and not self.logit_bias:
            object.__setattr__(self, "logit_bias", None)
        self.validate()

    @classmethod
    def with_defaults(cls, **overrides: Any) -> "SamplingParams":
        """Build params from request fields, where a ``None`` value means "use the default".

        Unknown names raise ``TypeError`` (a programming error, not a client error).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    def replace(self, **changes: Any) -> "SamplingParams":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        """True when sampling is a plain argmax (temperature below 1e-5)."""
        return self.temperature < 1e-5

    @property
    def needs_json(self) -> bool:
        """True when decoding must be constrained to JSON."""
        return self.json_schema is not None or self.json_object

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` naming the first invalid field."""
        for name, bounds in _FLOAT_RANGES.items():
            _check_float(name, getattr(self, name), *bounds)
        for name, (low, high) in _INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"{name} must be a boolean")
        self._validate_seed()
        self._validate_stops()
        self._validate_logit_bias()
        self._validate_cross_field()

    def _validate_seed(self) -> None:
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)

    def _validate_stops(self) -> None:
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidParameterError("stop", "stop must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(
                "stop", f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise InvalidParameterError("stop", "stop strings must be non-empty")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidParameterError("stop_token_ids", "stop_token_ids must be a list of integers")
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids", tok, 0, None)

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidParameterError("logit_bias", "logit_bias must be an object of token id -> bias")
        low, high = LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias", token, 0, None)
            _check_float("logit_bias", bias, low, high, True, True)

    def _validate_cross_field(self) -> None:
        if self.top_logprobs > 0 and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.json_schema is not None and not isinstance(self.json_schema, Mapping):
            raise InvalidParameterError("json_schema", "json_schema must be a JSON object")
        if self.json_schema is not None and self.json_object:
            raise InvalidParameterError(
                "json_schema", "json_schema and json_object are mutually exclusive")


def _check_float(name: str, value: Any, low: float, high: float,
                 low_inclusive: bool, high_inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(name, f"{name} must be a number, got {type(value).__name__}")
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and above and below):
        lo_b = "[" if low_inclusive else "("
        hi_b = "]" if high_inclusive else ")"
        raise InvalidParameterError(
            name, f"{name} must be in {lo_b}{low:g}, {high:g}{hi_b}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(name, f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidParameterError(name, f"{name} must be {allowed}, got {value}")
