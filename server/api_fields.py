"""Every request field of both APIs, classified once: honoured, refused, or accepted without effect.

``OPENAI_FIELDS`` covers ``POST /v1/chat/completions`` and ``/v1/completions`` (every parameter
of the official ``openai`` client's ``chat.completions.create`` / ``completions.create`` plus the
vLLM extensions the server reads); ``WORKERS_AI_FIELDS`` covers the Workers AI run body. A value
is ``"honoured"`` (a behavioural test shows the effect), ``"refused"`` (any value other than the
no-op default — null, false, an empty list, ``["text"]`` for ``modalities`` — is a 400 naming the
field) or ``"ignored: <reason>"`` (accepted and without effect, for the reason given). The
README's "API fields" table is generated from these dicts and checked against them by tests.
Fields outside these dicts are tolerated and logged (``server/body.py``).
"""

from __future__ import annotations

from typing import Any

OPENAI_FIELDS: dict[str, str] = {
    # the request and its prompt
    "model": "honoured",
    "messages": "honoured",
    "prompt": "honoured",
    "suffix": "honoured",
    "echo": "honoured",
    "stream": "honoured",
    "stream_options": "honoured",
    # length and stopping
    "max_tokens": "honoured",
    "max_completion_tokens": "honoured",
    "min_tokens": "honoured",
    "stop": "honoured",
    "stop_token_ids": "honoured",
    "ignore_eos": "honoured",
    "include_stop_str_in_output": "honoured",
    "skip_special_tokens": "honoured",
    # sampling
    "temperature": "honoured",
    "top_p": "honoured",
    "top_k": "honoured",
    "min_p": "honoured",
    "seed": "honoured",
    "n": "honoured",
    "best_of": "honoured",
    "logit_bias": "honoured",
    "presence_penalty": "honoured",
    "frequency_penalty": "honoured",
    "repetition_penalty": "honoured",
    "logprobs": "honoured",
    "top_logprobs": "honoured",
    # structured output and tools
    "response_format": "honoured",
    "tools": "honoured",
    "tool_choice": "honoured",
    "parallel_tool_calls": "honoured",
    "functions": "honoured",
    "function_call": "honoured",
    # speed: drafts for speculative decoding (runtime/speculative.py); the output does not depend on them
    "prediction": ("honoured: the output is the same with or without it; ONNX engines draft from it and report "
                   "accepted / rejected prediction tokens; TensorRT-LLM engines (and ONNX engines with LoRA adapters) "
                   "decode without it and leave those counts out of usage"),
    # OpenAI features this server does not have
    "audio": "refused",
    "modalities": "refused",
    "web_search_options": "refused",
    "moderation": "refused",
    # hints and bookkeeping that cannot change the output
    "user": "ignored: an end-user id for OpenAI's abuse monitoring; the server does not track users",
    "safety_identifier": "ignored: an end-user id for OpenAI's abuse monitoring; the server does not track users",
    "metadata": "ignored: tags for stored completions; nothing is stored",
    "store": "ignored: completions are never stored (there is no stored-completions API)",
    "service_tier": "ignored: there is one processing tier; every request is served the same way",
    "prompt_cache_key": "ignored: a routing hint for OpenAI's prompt cache; this server has no prompt cache",
    "prompt_cache_retention": "ignored: a retention hint for OpenAI's prompt cache; this server has no prompt cache",
    "prompt_cache_options": "ignored: options of OpenAI's prompt cache; this server has no prompt cache",
    "reasoning_effort": "ignored: the served models do not reason; there is no reasoning to limit",
    "verbosity": "ignored: a length hint for OpenAI's reasoning models; use max_tokens here",
}
"""OpenAI field -> ``honoured`` / ``refused`` / ``ignored: reason`` (both endpoints)."""

WORKERS_AI_FIELDS: dict[str, str] = {
    "prompt": "honoured",
    "messages": "honoured",
    "raw": "honoured",
    "stream": "honoured",
    "max_tokens": "honoured",
    "temperature": "honoured",
    "top_p": "honoured",
    "top_k": "honoured",
    "seed": "honoured",
    "repetition_penalty": "honoured",
    "frequency_penalty": "honoured",
    "presence_penalty": "honoured",
    "response_format": "honoured",
    "tools": "honoured",
    "functions": "honoured",
    "lora": "honoured",
}
"""Workers AI run-body field -> ``honoured`` / ``refused`` / ``ignored: reason``."""

_NO_OP = (None, False, [], ["text"])


def refused_field(body: Any, fields: dict[str, str]) -> str | None:
    """The first ``refused`` field of ``body`` set to something other than its no-op default."""
    for name, status in fields.items():
        if status == "refused" and getattr(body, name, None) not in _NO_OP:
            return name
    return None


def readme_rows(api: str, fields: dict[str, str]) -> list[str]:
    """The README "API fields" table rows for one API (``| api | `field` | status | reason |``)."""
    rows = []
    for name, status in fields.items():
        kind, _, reason = status.partition(": ")
        rows.append(f"| {api} | `{name}` | {kind} | {reason} |")
    return rows
