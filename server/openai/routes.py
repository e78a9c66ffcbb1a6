"""OpenAI-compatible routes, under ``/v1`` and DeepInfra's ``/v1/openai``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import HTTPException
from toolkit.server.auth import api_key_guard
from toolkit.server.body import decode_body, json_response
from toolkit.server.generation import Generation
from toolkit.server.openai.adapter import Prepared, prepare_chat, prepare_completion
from toolkit.server.openai.errors import error_body, exception_handler
from toolkit.server.openai.responses import (
    ChoiceText,
    ResponseMeta,
    chat_response,
    completion_response,
    gather,
    usage,
)
from toolkit.server.openai.schemas import ChatCompletionRequest, CompletionRequest
from toolkit.server.openai.stream import ChatStream, CompletionStream
from toolkit.server.openapi import json_body_operation
from toolkit.server.registry import ModelEntry
from toolkit.server.state import request_id_of, stamp_arrival, state_of
from toolkit.server.streaming import sse_response

_STARTED = int(time.time())


async def _respond(request: Request, prepared: Prepared, entry: ModelEntry, stream: ChatStream | CompletionStream,
                   build: Callable[[list[ChoiceText], dict[str, Any]], dict[str, Any]], streaming: bool) -> Response:
    """Run the generation; answer with SSE (``stream``'s chunks) or the JSON body ``build`` makes."""
    ctx = state_of(request)
    generation = Generation(entry, stamp_arrival(request, prepared.request), ctx.metrics, prepared.zero_tokens,
                            timeout_s=ctx.request_timeout_s)
    await generation.start()
    if streaming:
        return sse_response(generation, stream.chunks,
                            lambda g: stream.final(usage(entry, g.prompt_tokens, g.completion_tokens)), error_body)
    outputs = await generation.collect(request.receive)
    choices = gather(outputs, prepared.request.params.n)
    return json_response(build(choices, usage(entry, generation.prompt_tokens, generation.completion_tokens)))


class OpenAIController(Controller):
    """``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` (also under ``/v1/openai``)."""

    path = "/"
    tags = ["OpenAI"]
    guards = [api_key_guard]
    exception_handlers = {HTTPException: exception_handler, Exception: exception_handler}

    @post(["/v1/chat/completions", "/v1/openai/chat/completions"], status_code=200,
          operation_class=json_body_operation(ChatCompletionRequest), summary="Create a chat completion")
    async def chat_completions(self, request: Request) -> Response:
        """Chat completion, streamed as SSE when ``stream`` is true."""
        ctx = state_of(request)
        body = await decode_body(request, ChatCompletionRequest)
        entry = ctx.resolve(body.model)
        ctx.require_ready()
        p = prepare_chat(body, entry, request_id_of(request))
        meta = ResponseMeta.new("chatcmpl", body.model)
        stream = ChatStream(meta, p.request.params.n, p.tools, p.logprobs, p.include_usage)
        return await _respond(request, p, entry, stream,
                              lambda choices, u: chat_response(meta, choices, p.tools, p.logprobs, u), body.stream)

    @post(["/v1/completions", "/v1/openai/completions"], status_code=200,
          operation_class=json_body_operation(CompletionRequest), summary="Create a completion")
    async def completions(self, request: Request) -> Response:
        """Text completion of a raw prompt, streamed as SSE when ``stream`` is true."""
        ctx = state_of(request)
        body = await decode_body(request, CompletionRequest)
        entry = ctx.resolve(body.model)
        ctx.require_ready()
        p = prepare_completion(body, entry, request_id_of(request))
        meta = ResponseMeta.new("cmpl", body.model)
        stream = CompletionStream(meta, p.request.params.n, p.logprobs, p.include_usage, p.echo)
        return await _respond(request, p, entry, stream,
                              lambda choices, u: completion_response(meta, choices, p.logprobs, p.echo, u), body.stream)

    @get(["/v1/models", "/v1/openai/models"], summary="List the served models")
    async def models(self, request: Request) -> Response:
        """Every name each served model answers to (Hugging Face id first, then aliases)."""
        data = [{"id": name, "object": "model", "created": _STARTED, "owned_by": "toolkit", "root": entry.names[0]}
                for entry in state_of(request).models.entries for name in entry.names]
        return json_response({"object": "list", "data": data})
