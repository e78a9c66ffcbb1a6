"""Pure functions: an OpenAI request → the engine's ``GenerateRequest`` (+ what the response needs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest
from toolkit.server.errors import invalid
from toolkit.server.openai.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
)
from toolkit.server.registry import ModelEntry
from toolkit.server.engine_request import Origin, build_params, resolve_max_tokens
from toolkit.server.tools import ToolPlan, ToolSpec, make_plan, tool_call_text, tool_result_text

DEFAULT_MAX_TOKENS = 512


@dataclass
class Prepared:
    """The engine request plus the response options the adapter resolved."""

    request: GenerateRequest
    tools: ToolPlan
    zero_tokens: bool
    include_usage: bool
    logprobs: bool
    echo: str | None = None


def prepare_chat(req: ChatCompletionRequest, entry: ModelEntry, origin: Origin) -> Prepared:
    """Validate and map a chat completion request (rendered and tokenized once); raises ApiError / InvalidParameterError."""
    messages = chat_messages(req.messages)
    plan = tool_plan(req)
    messages = plan.apply(messages)
    json_fields = response_format_fields(req.response_format)
    schema = plan.json_schema()
    if schema is not None:
        if json_fields:
            raise invalid("response_format cannot be combined with a required or named tool_choice",
                          "response_format")
        json_fields = {"json_schema": schema}
    prompt_ids = entry.engine.prompts.encode(messages=messages)
    max_tokens, zero = _max_tokens(req.max_completion_tokens if req.max_tokens is None else req.max_tokens,
                                   entry, len(prompt_ids))
    params = _params(req, entry, max_tokens, logprobs=bool(req.logprobs),
                     top_logprobs=req.top_logprobs or 0, **json_fields)
    return Prepared(origin.request(prompt_ids, params), plan, zero, _include_usage(req), bool(req.logprobs))


def prepare_completion(req: CompletionRequest, entry: ModelEntry, origin: Origin) -> Prepared:
    """Validate and map a (legacy) completion request (a text prompt is tokenized once, token ids are used as given)."""
    prompt, given_ids = completion_prompt(req.prompt)
    prompts = entry.engine.prompts
    if given_ids is not None:
        prompts.check_ids(given_ids)
        prompt_ids = given_ids
    else:
        prompt_ids = prompts.encode(prompt=prompt)
    max_tokens, zero = _max_tokens(req.max_tokens, entry, len(prompt_ids))
    top = req.logprobs or 0
    params = _params(req, entry, max_tokens, logprobs=req.logprobs is not None, top_logprobs=top,
                     **response_format_fields(req.response_format))
    echo = (prompt or "") if req.echo else None
    return Prepared(origin.request(prompt_ids, params), ToolPlan(), zero, _include_usage(req),
                    req.logprobs is not None, echo)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages → ``{"role", "content"}`` turns the chat formats understand."""
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    names_by_id: dict[str, str] = {}
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        text = _content_text(message, i)
        role = message.role
        if role in ("system", "developer"):
            turns.append({"role": "system", "content": text or ""})
        elif role == "user":
            turns.append({"role": "user", "content": text or ""})
        elif role == "assistant":
            turns.append({"role": "assistant", "content": _assistant_text(message, i, text, names_by_id)})
        else:  # tool / function results become user turns
            name = names_by_id.get(message.tool_call_id or "") or message.name
            turns.append({"role": "user", "content": tool_result_text(name, text or "")})
    return turns


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """The tools of the request and the resolved ``tool_choice``."""
    tools = [ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in req.tools or ()]
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return make_plan(tools, choice)
    return make_plan(tools, "named", choice.function.name)


def response_format_fields(fmt: ResponseFormat | None) -> dict[str, Any]:
    """``response_format`` → ``json_object`` / ``json_schema`` sampling fields."""
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise invalid("response_format.json_schema.schema is required for type json_schema",
                      "response_format.json_schema")
    return {"json_schema": fmt.json_schema.schema}


def completion_prompt(prompt: str | list[Any]) -> tuple[str | None, list[int] | None]:
    """A completion prompt: one string, a one-string list, or a list of token ids."""
    if isinstance(prompt, str):
        return _non_empty(prompt), None
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return _non_empty(prompt[0]), None
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return None, list(prompt)
    raise invalid("prompt must be a non-empty string, a list with one string, or a list of token ids; "
                  "send one prompt per request", "prompt")


def _non_empty(prompt: str) -> str:
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    return prompt


def _content_text(message: ChatMessage, i: int) -> str | None:
    content = message.content
    if content is None:
        if message.role == "assistant" and message.tool_calls:
            return None
        raise invalid(f"messages[{i}].content is required", f"messages[{i}].content")
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{i}].content[{j}] has type {part.type!r}; only text parts are supported",
                          f"messages[{i}].content")
        parts.append(part.text)
    return "".join(parts)


def _assistant_text(message: ChatMessage, i: int, text: str | None, names_by_id: dict[str, str]) -> str:
    if not message.tool_calls:
        return text or ""
    calls = []
    for call in message.tool_calls:
        try:
            args = json.loads(call.function.arguments or "{}")
        except ValueError:
            raise invalid(f"messages[{i}].tool_calls: arguments of {call.function.name!r} is not valid JSON",
                          f"messages[{i}].tool_calls") from None
        calls.append((call.function.name, args))
        if call.id:
            names_by_id[call.id] = call.function.name
    rendered = tool_call_text(calls)
    return f"{text}\n{rendered}" if text else rendered


def _max_tokens(given: int | None, entry: ModelEntry, prompt_tokens: int) -> tuple[int, bool]:
    default = int(entry.defaults("openai").get("max_tokens", DEFAULT_MAX_TOKENS))
    return resolve_max_tokens(given, default, entry.context_length, prompt_tokens)


def _params(req: SamplingFields, entry: ModelEntry, max_tokens: int, **extra: Any) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    return build_params(
        entry.defaults("openai"), max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        min_p=req.min_p, top_k=req.top_k, stop=tuple(stop) if stop else None, n=req.n,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, **extra)


def _include_usage(req: SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)
