"""What both API adapters share to build the one immutable ``GenerateRequest`` of an HTTP request.

The adapter renders and tokenizes the prompt once (``engine.prompts.encode``), derives
``max_tokens`` from that prompt length, resolves sampling fields (user value → recipe default →
built-in) and stamps the request with the id and arrival time the request-context middleware
gave the HTTP request; the engine then takes the ids as they are.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Request
from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest

_RECIPE_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                          "presence_penalty", "frequency_penalty")


def build_params(api_defaults: dict[str, Any], **fields: Any) -> SamplingParams:
    """``SamplingParams`` from request fields; a ``None`` field takes the recipe's API default.

    Raises ``InvalidParameterError`` naming the field when a value is out of range.
    """
    values = dict(fields)
    for name in _RECIPE_DEFAULT_FIELDS:
        if values.get(name) is None and name in api_defaults:
            values[name] = api_defaults[name]
    return SamplingParams.with_defaults(**values)


def resolve_max_tokens(given: int | None, default: int, context_length: int, prompt_tokens: int) -> tuple[int, bool]:
    """``(max_tokens, zero)``: the value for ``SamplingParams`` and whether the client asked for 0.

    Without a client value, the recipe default is lowered so that prompt + output fit the
    context window (an over-long prompt is still rejected by the engine).
    """
    if given == 0:
        return 1, True
    if given is not None:
        return given, False
    room = context_length - prompt_tokens
    if context_length and room >= 1:
        return min(default, room), False
    return default, False


@dataclass(frozen=True)
class Origin:
    """Where an engine request comes from: the HTTP request's id and arrival time (``time.monotonic()``)."""

    request_id: str
    arrival_time: float

    def request(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerateRequest:
        """The engine request, stamped with this origin."""
        return GenerateRequest(tuple(prompt_ids), params, self.request_id, self.arrival_time)


def origin_of(request: Request) -> Origin:
    """The id and arrival time the request-context middleware gave this request (fresh ones otherwise)."""
    state = request.scope.get("state") or {}
    return Origin(state.get("request_id") or uuid.uuid4().hex, state.get("arrival_time") or time.monotonic())
