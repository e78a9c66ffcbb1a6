"""Workers AI route: ``POST /client/v4/accounts/{account_id}/ai/run/{model}``.

The model name contains slashes (``@hf/google/gemma-7b-it``); the cloudflare SDK sends them
percent-encoded (``@hf%2Fgoogle%2Fgemma-7b-it``). The ASGI server decodes both spellings into
the same ``scope["path"]``, from which the name is cut as plain text and looked up in the
model registry (it is never used as a filesystem path).
"""

from __future__ import annotations

from litestar import Controller, Request, Response, post
from litestar.exceptions import HTTPException
from toolkit.server.auth import api_key_guard
from toolkit.server.body import decode_body, json_response
from toolkit.server.generation import Generation
from toolkit.server.openapi import json_body_operation
from toolkit.server.state import request_id_of, stamp_arrival, state_of
from toolkit.server.streaming import sse_response
from toolkit.server.workers_ai.adapter import prepare_run
from toolkit.server.workers_ai.errors import error_body, exception_handler
from toolkit.server.workers_ai.responses import RunStream, envelope, run_result, usage
from toolkit.server.workers_ai.schemas import RunRequest

RUN_MARKER = "/ai/run/"


def model_from_path(path: str) -> str:
    """The model name: everything after ``/ai/run/`` in the decoded request path."""
    return path.split(RUN_MARKER, 1)[1] if RUN_MARKER in path else ""


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
        ctx = state_of(request)
        body = await decode_body(request, RunRequest)
        entry = ctx.resolve(model_from_path(request.scope["path"]))
        ctx.require_ready()
        prepared = prepare_run(body, entry, request_id_of(request))
        generation = Generation(entry, stamp_arrival(request, prepared.request), ctx.metrics, prepared.zero_tokens,
                                timeout_s=ctx.request_timeout_s)
        await generation.start()
        if body.stream:
            stream = RunStream(prepared.tools)
            return sse_response(generation, stream.chunks,
                                lambda g: stream.final(usage(g.prompt_tokens, g.completion_tokens)), error_body)
        outputs = await generation.collect(request.receive)
        text = "".join(d.text for out in outputs for d in out.choices)
        result = run_result(text, prepared.tools, prepared.json_mode,
                            usage(generation.prompt_tokens, generation.completion_tokens))
        return json_response(envelope(result))
