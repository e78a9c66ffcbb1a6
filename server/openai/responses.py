"""Pure functions: engine outputs → OpenAI response bodies (non-streaming), usage and logprobs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from toolkit.runtime.types import RequestOutput, TokenLogprob
from toolkit.server.registry import ModelEntry
from toolkit.server.tool_parse import ToolCall
from toolkit.server.tools import ToolPlan


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> "ResponseMeta":
        """A fresh id (``chatcmpl-…`` / ``cmpl-…``) and the current time."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


@dataclass
class ChoiceText:
    """Everything one choice generated."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def gather(outputs: list[RequestOutput], n: int) -> list[ChoiceText]:
    """Concatenate the deltas of each choice."""
    choices = [ChoiceText() for _ in range(n)]
    for output in outputs:
        for delta in output.choices:
            choice = choices[delta.index]
            choice.text += delta.text
            choice.logprobs.extend(delta.logprobs or ())
            choice.finish_reason = delta.finish_reason or choice.finish_reason
    return choices


def usage(entry: ModelEntry, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          prediction: tuple[int, int] | None = None) -> dict[str, Any]:
    """``usage`` with DeepInfra's ``estimated_cost`` from the recipe's prices and OpenAI's
    ``prompt_tokens_details.cached_tokens`` (prompt tokens served by the engine's prefix cache);
    for a request with ``prediction``, ``completion_tokens_details.accepted_prediction_tokens`` /
    ``rejected_prediction_tokens`` (``prediction`` = that pair, ``runtime/speculative.py`` counts them)."""
    body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "estimated_cost": entry.estimated_cost(prompt_tokens, completion_tokens),
    }
    if prediction is not None:
        body["completion_tokens_details"] = {"accepted_prediction_tokens": prediction[0],
                                             "rejected_prediction_tokens": prediction[1]}
    return body


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """Chat-format logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": _raw(t.token_bytes, t.token),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": _raw(t.top_bytes[i] if t.top_bytes else None, s)}
                          for i, (_, s, lp) in enumerate(t.top)]}
        for t in tokens
    ]}


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, position = [], offset
    for t in tokens:
        offsets.append(position)
        position += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{s: lp for _, s, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls``: arguments as a JSON string."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in calls]


def finish_reason(reason: str | None) -> str:
    """The engine's finish reason as OpenAI spells it (``stop`` when it gave none)."""
    return reason or "stop"


def chat_response(meta: ResponseMeta, choices: list[ChoiceText], tools: ToolPlan, want_logprobs: bool,
                  usage_body: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` body."""
    out = []
    for index, choice in enumerate(choices):
        calls = tools.parse(choice.text)
        if calls:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(calls)}
            reason = "tool_calls"
        else:
            message, reason = {"role": "assistant", "content": choice.text}, finish_reason(choice.finish_reason)
        body: dict[str, Any] = {"index": index, "message": message}
        if want_logprobs:
            body["logprobs"] = chat_logprobs(choice.logprobs)
        body["finish_reason"] = reason
        out.append(body)
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": out, "usage": usage_body}


def completion_response(meta: ResponseMeta, choices: list[ChoiceText], want_logprobs: bool,
                        echo: str | list[str | None] | None, usage_body: dict[str, Any]) -> dict[str, Any]:
    """The ``text_completion`` body; ``echo``: the prompt text in front of every choice, or one per choice."""
    out = []
    for index, choice in enumerate(choices):
        prefix = echo_of(echo, index)
        out.append({
            "index": index,
            "text": prefix + choice.text,
            "logprobs": completion_logprobs(choice.logprobs, len(prefix)) if want_logprobs else None,
            "finish_reason": finish_reason(choice.finish_reason),
        })
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": out, "usage": usage_body}


def echo_of(echo: str | list[str | None] | None, index: int) -> str:
    """The echoed prompt of choice ``index``: one text for all choices, or a per-choice list."""
    if isinstance(echo, list):
        return echo[index] or "" if index < len(echo) else ""
    return echo or ""


def _raw(token_bytes: bytes | None, text: str) -> list[int]:
    """The token's raw bytes when the engine knows them, else its text in UTF-8."""
    return list(token_bytes) if token_bytes is not None else list(text.encode("utf-8"))
