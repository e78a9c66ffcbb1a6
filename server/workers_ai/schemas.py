"""Workers AI text-generation input (both the ``prompt`` and the ``messages`` form) as msgspec Structs.

Ranges follow the Workers AI model page of gemma-7b-it
(https://developers.cloudflare.com/workers-ai/models/gemma-7b-it/): max_tokens default 256,
temperature 0..5 (default 0.6), top_p 0.001..1, top_k 1..50, seed 1..9999999999,
repetition_penalty 0..2, frequency/presence penalty -2..2. Unknown fields are ignored (and logged).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct


class Message(Struct):
    """One conversation message; ``tool_calls`` / ``tool_call_id`` / ``name`` are accepted for tool turns."""

    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Function(Struct):
    """An embedded function (name + code); served as a tool without parameters, the code is not run."""

    name: str
    code: str


class ToolParameters(Struct):
    type: str
    properties: dict[str, Any]
    required: list[str] | None = None


class FlatTool(Struct):
    """``{"name", "description", "parameters"}``."""

    name: Annotated[str, Meta(min_length=1)]
    description: str
    parameters: ToolParameters


class FunctionTool(Struct):
    """``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: str
    function: FlatTool


class ResponseFormat(Struct):
    """JSON mode: ``json_object``, or ``json_schema`` with the schema in ``json_schema``."""

    type: Literal["json_object", "json_schema"] | None = None
    json_schema: Any = None


class RunRequest(Struct, kw_only=True):
    """``POST /client/v4/accounts/{account_id}/ai/run/{model}`` body (either form)."""

    prompt: Annotated[str, Meta(min_length=1)] | None = None
    messages: list[Message] | None = None
    raw: bool = False
    lora: str | None = None
    functions: list[Function] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=5)] | None = None
    top_p: Annotated[float, Meta(ge=0.001, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=1, le=50)] | None = None
    seed: Annotated[int, Meta(ge=1, le=9_999_999_999)] | None = None
    repetition_penalty: Annotated[float, Meta(ge=0, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
