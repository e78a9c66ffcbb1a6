"""Pure functions: a Workers AI run request → the engine's ``GenerateRequest``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import msgspec
from toolkit.runtime.prompting import PromptBuilder
from toolkit.runtime.types import GenerateRequest
from toolkit.server.body import validation_error
from toolkit.server.errors import ApiError, invalid
from toolkit.server.registry import ModelEntry
from toolkit.server.engine_request import Origin, build_params, resolve_max_tokens
from toolkit.server.tools import ToolPlan, ToolSpec, make_plan, tool_call_text, tool_result_text
from toolkit.server.workers_ai.schemas import FlatTool, FunctionTool, Message, ResponseFormat, RunRequest

#: Workers AI's own defaults, used when a recipe has none.
WORKERS_AI_DEFAULTS: dict[str, Any] = {"temperature": 0.6, "max_tokens": 256}


@dataclass
class Prepared:
    """The engine request plus what the response needs."""

    request: GenerateRequest
    tools: ToolPlan
    zero_tokens: bool
    json_mode: bool


def prepare_run(req: RunRequest, entry: ModelEntry, origin: Origin) -> Prepared:
    """Validate and map a run request (rendered and tokenized once); raises ApiError / InvalidParameterError."""
    adapter = _lora(req, entry)
    if (req.prompt is None) == (req.messages is None):
        raise invalid("send exactly one of 'prompt' or 'messages'", "prompt" if req.prompt else "messages")
    json_fields = response_format_fields(req.response_format)
    if json_fields and req.stream:
        raise invalid("JSON mode (response_format) cannot be combined with stream; set stream to false",
                      "response_format")
    plan = make_plan(tool_specs(req), None)
    prompt_ids = _prompt_ids(req, plan, entry.engine.prompts)
    defaults = {**WORKERS_AI_DEFAULTS, **entry.defaults("workers_ai")}
    max_tokens, zero = resolve_max_tokens(req.max_tokens, int(defaults["max_tokens"]), entry.context_length,
                                          len(prompt_ids))
    params = build_params(
        defaults, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        seed=req.seed, repetition_penalty=repetition_penalty(req.repetition_penalty),
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty, **json_fields)
    return Prepared(dataclasses.replace(origin.request(prompt_ids, params), adapter=adapter), plan, zero,
                    bool(json_fields))


def _lora(req: RunRequest, entry: ModelEntry) -> str | None:
    """The LoRA adapter ``lora`` names: 405/5005 for a model without adapters, 400/5007 for an unknown one."""
    if not req.lora:
        return entry.adapter
    if not entry.adapter_names:
        raise ApiError("lora_unsupported", f"LoRA adapter {req.lora!r} is not available: the model "
                       f"{entry.names[0]!r} has no LoRA adapters; remove 'lora'", "lora")
    if req.lora not in entry.adapter_names:
        raise ApiError("unknown_model", f"the LoRA adapter {req.lora!r} is not served for {entry.names[0]!r}; "
                       f"served adapters: {', '.join(entry.adapter_names)}", "lora")
    return req.lora


def _prompt_ids(req: RunRequest, plan: ToolPlan, prompts: PromptBuilder) -> list[int]:
    """The prompt's token ids: ``prompt`` as a user turn (as is with ``raw``), or the ``messages``."""
    if req.prompt is not None:
        if plan.active:
            raise invalid("tools and functions need the messages form", "tools")
        if req.raw:
            return prompts.encode(prompt=req.prompt, raw=True)
        return prompts.encode(messages=[{"role": "user", "content": req.prompt}])
    return prompts.encode(messages=plan.apply(messages_to_turns(req.messages or [])))


def repetition_penalty(value: float | None) -> float | None:
    """Workers AI allows 0..2; 0 means no penalty here (the engine's range starts at 0.01)."""
    if value is None:
        return None
    return 1.0 if value == 0 else max(value, 0.01)


def tool_specs(req: RunRequest) -> list[ToolSpec]:
    """Both tool forms (flat and OpenAI) plus ``functions`` (as tools without parameters)."""
    specs = []
    for i, item in enumerate(req.tools or ()):
        kind, path = (FunctionTool, f"tools[{i}]") if "function" in item else (FlatTool, f"tools[{i}]")
        try:
            tool = msgspec.convert(item, kind)
        except msgspec.ValidationError as exc:
            raise _prefixed(exc, path) from None
        flat = tool.function if isinstance(tool, FunctionTool) else tool
        specs.append(ToolSpec(flat.name, flat.description, msgspec.to_builtins(flat.parameters)))
    specs.extend(ToolSpec(f.name, "") for f in req.functions or ())
    return specs


def messages_to_turns(messages: list[Message]) -> list[dict[str, str]]:
    """Workers AI messages → ``{"role", "content"}`` turns; tool turns in the generic tool format."""
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    turns = []
    for i, message in enumerate(messages):
        if message.role == "system" or message.role == "user":
            turns.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            turns.append({"role": "assistant", "content": _assistant_content(message, i)})
        elif message.role == "tool":
            turns.append({"role": "user", "content": tool_result_text(message.name, message.content)})
        else:
            raise invalid(f"messages[{i}].role must be system, user, assistant or tool, got {message.role!r}",
                          f"messages[{i}].role")
    return turns


def response_format_fields(fmt: ResponseFormat | None) -> dict[str, Any]:
    """JSON mode → ``json_object`` / ``json_schema`` sampling fields."""
    if fmt is None or fmt.type is None:
        return {}
    if fmt.type == "json_object":
        return {"json_object": True}
    schema = fmt.json_schema
    if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
        schema = schema["schema"]  # OpenAI-style {"name", "schema"} wrapper
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema must be a JSON schema object", "response_format.json_schema")
    return {"json_schema": schema}


def _assistant_content(message: Message, i: int) -> str:
    if not message.tool_calls:
        return message.content
    calls = []
    for call in message.tool_calls:
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise invalid(f"messages[{i}].tool_calls: arguments is not valid JSON",
                              f"messages[{i}].tool_calls") from None
        calls.append((str(fn.get("name", "")), args))
    rendered = tool_call_text(calls)
    return f"{message.content}\n{rendered}" if message.content else rendered


def _prefixed(exc: msgspec.ValidationError, prefix: str) -> Exception:
    text = str(exc).replace("`$.", f"`$.{prefix}.").replace("`$`", f"`$.{prefix}`")
    if " - at `" not in text:
        text += f" - at `$.{prefix}`"
    return validation_error(msgspec.ValidationError(text))
