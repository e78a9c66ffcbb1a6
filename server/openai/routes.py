"""OpenAI-compatible routes, under ``/v1`` and DeepInfra's ``/v1/openai``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import HTTPException
from toolkit.runtime.types import RequestOutput
from toolkit.server.auth import api_key_guard
from toolkit.server.body import json_response
from toolkit.server.engine_request import origin_of
from toolkit.server.generation import Generation
from toolkit.server.openai.adapter import Prepared, prepare_chat, prepare_completion
from toolkit.server.openai.batch import BatchGeneration
from toolkit.server.openai.errors import error_body, exception_handler
from toolkit.server.openai.responses import ChoiceText, ResponseMeta, chat_response, completion_response, gather, usage
from toolkit.server.openai.schemas import ChatCompletionRequest, CompletionRequest
from toolkit.server.openai.stream import ChatStream, CompletionStream
from toolkit.server.openapi import json_body_operation
from toolkit.server.registry import ModelEntry
from toolkit.server.respond import accept, respond
from toolkit.server.state import state_of
from toolkit.server.streaming import sse_response
from toolkit.server.openai.tokenize import DetokenizeRequest, TokenizeRequest, detokenize_body, tokenize_body

_STARTED = int(time.time())


@dataclass
class _Reply:
    """OpenAI's shapes for one request: ``stream``'s chunks, or the body ``build`` makes from the gathered choices."""

    entry: ModelEntry
    n: int
    stream: ChatStream | CompletionStream
    build: Callable[[list[ChoiceText], dict[str, Any]], dict[str, Any]]
    continuous_usage: bool = False
    single_call: bool = False
    prediction: bool = False
    """The request carried ``prediction`` and the engine drafted from it (``counts_prediction``): usage
    reports ``completion_tokens_details``."""

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        chunks = self.stream.chunks(output)
        if self.single_call:
            chunks = first_call_only(chunks)
        if self.continuous_usage:  # vLLM's stream_options.continuous_usage_stats: the usage so far on every chunk
            for chunk in chunks:
                chunk["usage"] = usage(self.entry, output.prompt_tokens, output.completion_tokens, output.cached_tokens,
                                       (output.accepted_prediction_tokens, output.rejected_prediction_tokens)
                                       if self.prediction else None)
        return chunks

    def final(self, generation: Generation) -> list[dict[str, Any]]:
        chunks = self.stream.final(self._usage(generation))
        if self.single_call:
            chunks = first_call_only(chunks)
        if self.continuous_usage:
            for chunk in chunks:
                chunk["usage"] = self._usage(generation)
        return chunks

    def body(self, outputs: list[RequestOutput], generation: Generation) -> dict[str, Any]:
        return self.build(gather(outputs, self.n), self._usage(generation))

    def _usage(self, generation: Generation) -> dict[str, Any]:
        return usage(self.entry, generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens,
                     generation.prediction_tokens if self.prediction else None)


def counts_prediction(engine: Any) -> bool:
    """Whether ``engine`` drafts from OpenAI's ``prediction`` (an ONNX engine's speculator,
    ``runtime/speculative.py``) and so counts its accepted / rejected tokens.

    An engine without one (TensorRT-LLM; ONNX with LoRA adapters or a graph that cannot verify drafts)
    decodes as if there were no ``prediction``: the output is the same (Predicted Outputs only speed
    decoding up), but it has no counts, and 0 / 0 would be false by OpenAI's definitions (tokens of
    the prediction that did / did not appear in the completion,
    https://platform.openai.com/docs/api-reference/chat/object#chat/object-usage). Usage then leaves
    ``completion_tokens_details`` out, as for a request without ``prediction`` (the fields are optional).
    So does a quantized ONNX engine unless served with ``--predicted-outputs`` (``SpeculativeConfig``).
    """
    speculator = getattr(engine, "speculator", None)
    return speculator is not None and bool(speculator.config.predicted_outputs)


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
        body, entry = await accept(request, ChatCompletionRequest, lambda b: b.model)
        p = prepare_chat(body, entry, origin_of(request))
        meta, n = ResponseMeta.new("chatcmpl", body.model), p.request.params.n
        reply = _Reply(entry, n, ChatStream(meta, n, p.tools, p.logprobs, p.include_usage),
                       lambda choices, u: chat_response(meta, choices, p.tools, p.logprobs, u), p.continuous_usage,
                       body.parallel_tool_calls is False,
                       p.request.prediction_ids is not None and counts_prediction(entry.engine))
        return await respond(request, entry, p.request, p.zero_tokens, reply, body.stream, error_body)

    @post(["/v1/completions", "/v1/openai/completions"], status_code=200,
          operation_class=json_body_operation(CompletionRequest), summary="Create a completion")
    async def completions(self, request: Request) -> Response:
        """Text completion of a raw prompt, streamed as SSE when ``stream`` is true."""
        body, entry = await accept(request, CompletionRequest, lambda b: b.model)
        p = prepare_completion(body, entry, origin_of(request))
        meta, n = ResponseMeta.new("cmpl", body.model), p.request.params.n
        if len(p.batch) > 1:
            return await _respond_batch(request, entry, p, meta, body.stream)
        reply = _Reply(entry, n, CompletionStream(meta, n, p.logprobs, p.include_usage, p.echo),
                       lambda choices, u: completion_response(meta, choices, p.logprobs, p.echo, u),
                       p.continuous_usage)
        return await respond(request, entry, p.request, p.zero_tokens, reply, body.stream, error_body)

    @post(["/tokenize", "/v1/tokenize", "/v1/openai/tokenize"], status_code=200,
          operation_class=json_body_operation(TokenizeRequest), summary="Tokenize a prompt or chat (vLLM)")
    async def tokenize(self, request: Request) -> Response:
        """``{model, prompt}`` or ``{model, messages}`` → ``{count, max_model_len, tokens}`` (the chat template applied)."""
        body, entry = await accept(request, TokenizeRequest, lambda b: b.model)
        return json_response(tokenize_body(body, entry))

    @post(["/detokenize", "/v1/detokenize", "/v1/openai/detokenize"], status_code=200,
          operation_class=json_body_operation(DetokenizeRequest), summary="Detokenize token ids (vLLM)")
    async def detokenize(self, request: Request) -> Response:
        """``{model, tokens}`` → ``{prompt}``."""
        body, entry = await accept(request, DetokenizeRequest, lambda b: b.model)
        return json_response(detokenize_body(body, entry))

    @get(["/v1/models", "/v1/openai/models"], summary="List the served models")
    async def models(self, request: Request) -> Response:
        """Every name each served model answers to (Hugging Face id first, then aliases)."""
        models = state_of(request).models
        data = [{"id": name, "object": "model", "created": _STARTED, "owned_by": "toolkit", "root": entry.names[0]}
                for entry in models.entries for name in entry.names]
        data += [{"id": entry.names[1], "object": "model", "created": _STARTED, "owned_by": "toolkit",  # LoRA (as vLLM)
                  "root": entry.names[0], "parent": entry.parent} for entry in models.adapter_entries]
        return json_response({"object": "list", "data": data})


async def _respond_batch(request: Request, entry: ModelEntry, p: Prepared, meta: ResponseMeta, streaming: bool) -> Response:
    """A list of prompts: one generation per prompt run concurrently, merged (choice ``i * n + j``)."""
    state = state_of(request)
    n = p.request.params.n
    parts = [Generation(entry, one, state.metrics, p.zero_tokens, timeout_s=state.request_timeout_s)
             for one in p.batch]
    generation = BatchGeneration(parts, n)
    total = n * len(p.batch)
    reply = _Reply(entry, total, CompletionStream(meta, total, p.logprobs, p.include_usage, _per_choice(p.echoes, n)),
                   lambda choices, u: completion_response(meta, choices, p.logprobs, _per_choice(p.echoes, n), u),
                   p.continuous_usage)
    await generation.start()
    if streaming:
        return sse_response(generation, reply.chunks, reply.final, error_body)  # type: ignore[arg-type]
    outputs = await generation.collect(request.receive)
    return json_response(reply.body(outputs, generation))  # type: ignore[arg-type]


def _per_choice(echoes: list[str | None], n: int) -> list[str | None]:
    """Each prompt's echo repeated for its ``n`` choices."""
    return [echo for echo in echoes for _ in range(n)]


def first_call_only(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``parallel_tool_calls: false`` on a stream: the tool-call deltas of calls after the first are dropped."""
    out = []
    for chunk in chunks:
        dropped, choices = False, []
        for choice in chunk["choices"]:
            calls = (choice.get("delta") or {}).get("tool_calls")
            if calls:
                kept = [c for c in calls if c.get("index", 0) == 0]
                dropped = dropped or len(kept) < len(calls)
                delta = {k: v for k, v in choice["delta"].items() if k != "tool_calls" or kept}
                if kept:
                    delta["tool_calls"] = kept
                if not kept and set(delta) <= {"role", "content"} and not delta.get("content"):
                    continue
                choice = {**choice, "delta": delta}
            choices.append(choice)
        if dropped and not choices:
            continue
        out.append({**chunk, "choices": choices})
    return out
