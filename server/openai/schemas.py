"""OpenAI (DeepInfra flavour) request schemas as msgspec Structs, with the reference ranges.

Ranges follow DeepInfra's OpenAI-compatible API (https://deepinfra.com/docs/openai_api) and
the OpenAI chat API reference (https://platform.openai.com/docs/api-reference/chat/create):
temperature 0..2, top_p (0,1], min_p 0..1, top_k 0..<1000, max_tokens 0..1000000, up to 16
stop sequences, n 1..4, penalties -2..2, repetition_penalty 0.01..5, seed 0..2**63-1. ``None``
means "not given": the recipe's default (``defaults.openai``) applies. Unknown fields are ignored (and logged).
Every field is classified (honoured / refused / accepted without effect) in ``server/api_fields.py``;
vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, stream_options.continuous_usage_stats) follow
vLLM's ``entrypoints/openai/protocol.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
MinP = Annotated[float, Meta(ge=0, le=1)]
TopK = Annotated[int, Meta(ge=0, lt=1000)]
MaxTokens = Annotated[int, Meta(ge=0, le=1_000_000)]
N = Annotated[int, Meta(ge=1, le=4)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Meta(ge=0.01, le=5)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=16)]
LogitBias = dict[str, Annotated[float, Meta(ge=-100, le=100)]]
TokenIds = Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=1024)]


class FunctionDefinition(Struct):
    """A tool's function: name, description and JSON-schema parameters."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    """``{"type": "function", "function": {...}}``."""

    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    """``{"type": "function", "function": {"name": ...}}``: force that tool."""

    function: NamedFunction
    type: Literal["function"] = "function"


class ToolCallFunction(Struct):
    name: str
    arguments: str = "{}"


class MessageToolCall(Struct):
    """A tool call of a past assistant turn (arguments are a JSON string)."""

    function: ToolCallFunction
    id: str | None = None
    type: Literal["function"] = "function"


class ContentPart(Struct):
    """One part of a multi-part message content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(Struct):
    """One conversation message: system/developer, user, assistant or tool."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(Struct):
    """``include_usage``: send one more chunk with the usage before ``[DONE]``; vLLM's
    ``continuous_usage_stats``: every chunk also carries the usage so far."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(Struct):
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct):
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": ...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(Struct, kw_only=True):
    """The sampling fields both endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    min_p: MinP | None = None
    top_k: TopK | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    n: N | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    logit_bias: LogitBias | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # accepted without effect (see server/api_fields.py)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None


class FunctionName(Struct):
    name: str


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # refused unless the no-op default (see server/api_fields.py)
    audio: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None
    moderation: Any = None
    prediction: Any = None  # Predicted Outputs: speculative drafts (adapter.prediction_text checks the shape)
    # accepted without effect
    reasoning_effort: str | None = None
    verbosity: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or a batch of either."""

    prompt: str | list[Any]
    suffix: str | None = None
    best_of: N | None = None
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    response_format: ResponseFormat | None = None
