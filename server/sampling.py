"""Resolve sampling fields of either API into ``SamplingParams``: user value → recipe default → built-in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolkit.runtime.sampling_params import SamplingParams

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


def resolve_max_tokens(given: int | None, default: int, context_length: int,
                       count_prompt: Callable[[], int]) -> tuple[int, bool]:
    """``(max_tokens, zero)``: the value for ``SamplingParams`` and whether the client asked for 0.

    Without a client value, the recipe default is lowered so that prompt + output fit the
    context window (an over-long prompt is still rejected by the engine).
    """
    if given == 0:
        return 1, True
    if given is not None:
        return given, False
    if context_length:
        room = context_length - count_prompt()
        if room >= 1:
            return min(default, room), False
    return default, False
