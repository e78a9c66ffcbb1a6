"""Pure functions: an OpenAI request → the engine's ``GenerateRequest`` (+ what the response needs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest
from toolkit.server.api_fields import OPENAI_FIELDS, refused_field
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
from toolkit.server.tool_parse import ToolCall
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
    continuous_usage: bool = False
    batch: list[GenerateRequest] = field(default_factory=list)
    """Every prompt's request of a batched /v1/completions (``request`` is the first)."""
    echoes: list[str | None] = field(default_factory=list)


def prepare_chat(req: ChatCompletionRequest, entry: ModelEntry, origin: Origin) -> Prepared:
    """Validate and map a chat completion request (rendered and tokenized once); raises ApiError / InvalidParameterError."""
    refuse_unsupported(req)
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
    request = origin.request(prompt_ids, params)
    prediction = prediction_text(req.prediction)
    if prediction:
        request = dataclasses.replace(request, prediction_ids=tuple(entry.engine.prompts.encode(prompt=prediction, raw=True)))
    return Prepared(request, plan, zero, _include_usage(req), bool(req.logprobs),
                    continuous_usage=_continuous_usage(req))


def prediction_text(prediction: Any) -> str | None:
    """The text of OpenAI's ``prediction`` (Predicted Outputs): ``{"type": "content", "content": str | [text parts]}``.

    It only speeds decoding up (speculative drafts, ``runtime/speculative.py``); the output is what
    the model would produce without it. Any other shape is a 400 naming the field.
    https://platform.openai.com/docs/api-reference/chat/create#chat-create-prediction
    """
    if prediction is None:
        return None
    shape = 'prediction must be {"type": "content", "content": a string or a list of {"type": "text", "text": ...}}'
    if not isinstance(prediction, dict) or prediction.get("type") != "content" or set(prediction) - {"type", "content"}:
        raise invalid(shape, "prediction")
    content = prediction.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            and not set(part) - {"type", "text"} for part in content):
        raise invalid(shape, "prediction.content")
    return "".join(part["text"] for part in content)


def prepare_completion(req: CompletionRequest, entry: ModelEntry, origin: Origin) -> Prepared:
    """Validate and map a (legacy) completion request: one prompt or a batch (a list of strings or of
    token-id lists), each a request of its own; text prompts are tokenized once, token ids used as given."""
    refuse_unsupported(req)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid(f"best_of must equal n ({req.n or 1}): this server returns every candidate it generates; "
                      "use n", "best_of")
    prompts = entry.engine.prompts
    requests, echoes, zero = [], [], False
    for k, (prompt, given_ids) in enumerate(completion_prompts(req.prompt)):
        if given_ids is not None:
            if req.suffix is not None:
                raise invalid("suffix needs a text prompt (the fill-in-the-middle prompt is built from text)", "suffix")
            prompts.check_ids(given_ids)
            prompt_ids = given_ids
        elif req.suffix is not None:
            prompt_ids = prompts.encode_fim(prompt or "", req.suffix)
        else:
            prompt_ids = prompts.encode(prompt=prompt)
        max_tokens, zero = _max_tokens(req.max_tokens, entry, len(prompt_ids))
        params = _params(req, entry, max_tokens, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
                         **response_format_fields(req.response_format))
        one = origin.request(prompt_ids, params)
        requests.append(one if k == 0 else dataclasses.replace(one, request_id=f"{one.request_id}-{k}"))
        echoes.append((prompt if given_ids is None else prompts.detokenize(given_ids)) if req.echo else None)
    return Prepared(requests[0], ToolPlan(), zero, _include_usage(req), req.logprobs is not None, echoes[0],
                    _continuous_usage(req), requests, echoes)


def refuse_unsupported(req: SamplingFields) -> None:
    """A 400 naming the first field this server refuses (``server/api_fields.py``) when it is set."""
    name = refused_field(req, OPENAI_FIELDS)
    if name is not None:
        raise invalid(f"{name} is not supported by this server (text generation only); remove it", name)


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
    """The tools of the request and the resolved ``tool_choice`` (the legacy ``functions`` /
    ``function_call`` are the same thing); ``parallel_tool_calls: false`` keeps the first call only."""
    if req.functions is not None and req.tools is not None:
        raise invalid("send either tools or the deprecated functions, not both", "functions")
    if req.function_call is not None and req.tool_choice is not None:
        raise invalid("send either tool_choice or the deprecated function_call, not both", "function_call")
    functions = req.functions if req.functions is not None else [t.function for t in req.tools or ()]
    tools = [ToolSpec(f.name, f.description, f.parameters) for f in functions]
    choice = req.tool_choice if req.tool_choice is not None else req.function_call
    if choice is None or isinstance(choice, str):
        plan = make_plan(tools, choice)
    else:
        name = choice.name if hasattr(choice, "name") else choice.function.name
        plan = make_plan(tools, "named", name)
    return SingleCallPlan(plan.tools, plan.mode, plan.forced) if req.parallel_tool_calls is False else plan


@dataclass(frozen=True)
class SingleCallPlan(ToolPlan):
    """``parallel_tool_calls: false``: the model is told to call one tool, and only the first call is kept."""

    def preamble(self) -> str:
        return super().preamble().replace("; to call several tools, reply with a JSON array of such objects", "") \
            + " Call at most one tool."

    def parse(self, text: str) -> list[ToolCall] | None:
        calls = super().parse(text)
        return calls[:1] if calls else calls


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


MAX_BATCH_PROMPTS = 16


def completion_prompts(prompt: str | list[Any]) -> list[tuple[str | None, list[int] | None]]:
    """The prompts of a completion request: a string, a list of token ids, or a list of either
    (a batch, one choice set per prompt); each as ``(text, None)`` or ``(None, ids)``."""
    if isinstance(prompt, str):
        return [(_non_empty(prompt), None)]
    if prompt and all(_is_id(t) for t in prompt):
        return [(None, list(prompt))]
    if prompt and len(prompt) <= MAX_BATCH_PROMPTS and all(isinstance(p, str) for p in prompt):
        return [(_non_empty(p), None) for p in prompt]
    if (prompt and len(prompt) <= MAX_BATCH_PROMPTS
            and all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt)):
        return [(None, list(p)) for p in prompt]
    raise invalid("prompt must be a non-empty string, a list of token ids, or a list of up to "
                  f"{MAX_BATCH_PROMPTS} strings or of up to {MAX_BATCH_PROMPTS} token-id lists", "prompt")


def _is_id(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and token >= 0


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
        repetition_penalty=req.repetition_penalty, seed=req.seed,
        logit_bias=logit_bias(req.logit_bias, entry.engine.prompts.vocab_size), min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids) if req.stop_token_ids else None, ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        **extra)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` (JSON keys are strings) as ``{id: bias}``; ids must be in the vocabulary."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit() or int(key) >= vocab_size:
            raise invalid(f"logit_bias key {key[:32]!r} is not a token id in [0, {vocab_size})", "logit_bias")
        out[int(key)] = float(value)
    return out


def _include_usage(req: SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _continuous_usage(req: SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)
