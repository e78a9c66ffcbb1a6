"""Workers AI route: ``POST /client/v4/accounts/{account_id}/ai/run/{model}``.

The model name contains slashes (``@hf/google/gemma-7b-it``); the cloudflare SDK sends them
percent-encoded (``@hf%2Fgoogle%2Fgemma-7b-it``). The ASGI server decodes both spellings into
the same ``scope["path"]``, from which the name is cut as plain text and looked up in the
model registry (it is never used as a filesystem path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, post
from litestar.exceptions import HTTPException
from toolkit.runtime.types import RequestOutput
from toolkit.server.auth import api_key_guard
from toolkit.server.engine_request import origin_of
from toolkit.server.generation import Generation
from toolkit.server.openapi import json_body_operation
from toolkit.server.respond import accept, respond
from toolkit.server.workers_ai.adapter import Prepared, prepare_run
from toolkit.server.workers_ai.errors import error_body, exception_handler
from toolkit.server.workers_ai.responses import RunStream, envelope, run_result, usage
from toolkit.server.workers_ai.schemas import RunRequest

RUN_MARKER = "/ai/run/"


def model_from_path(path: str) -> str:
    """The model name: everything after ``/ai/run/`` in the decoded request path."""
    return path.split(RUN_MARKER, 1)[1] if RUN_MARKER in path else ""


@dataclass
class _Reply:
    """Workers AI's shapes: ``{"response"}`` chunks, or the enveloped result (text, tool calls or a JSON object)."""

    prepared: Prepared
    stream: RunStream

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        return self.stream.chunks(output)

    def final(self, generation: Generation) -> list[dict[str, Any]]:
        return self.stream.final(usage(generation.prompt_tokens, generation.completion_tokens))

    def body(self, outputs: list[RequestOutput], generation: Generation) -> dict[str, Any]:
        text = "".join(d.text for out in outputs for d in out.choices)
        result = run_result(text, self.prepared.tools, self.prepared.json_mode,
                            usage(generation.prompt_tokens, generation.completion_tokens))
        return envelope(result)


class WorkersAIController(Controller):
    """Cloudflare Workers AI text generation."""

    path = "/client/v4/accounts/{account_id:str}/ai/run"
    tags = ["Workers AI"]
    guards = [api_key_guard]
    exception_handlers = {HTTPException: exception_handler, Exception: exception_handler}

    @post("/{model:path}", status_code=200, operation_class=json_body_operation(RunRequest),
          summary="Run a text generation model")
    async def run(self, request: Request) -> Response:
        """Generate text (or tool calls, or a JSON object); SSE when ``stream`` is true."""
        body, entry = await accept(request, RunRequest, lambda _: model_from_path(request.scope["path"]))
        prepared = prepare_run(body, entry, origin_of(request))
        reply = _Reply(prepared, RunStream(prepared.tools))
        return await respond(request, entry, prepared.request, prepared.zero_tokens, reply, body.stream, error_body)
