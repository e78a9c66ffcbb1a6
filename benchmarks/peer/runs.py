"""The measurements of the peer comparison, one side at a time (the caller alternates the sides).

- ``http_level``: issue 13's table row: ``concurrency`` streams of a 108-token prompt and 128 greedy
  tokens with ``ignore_eos`` through ``toolkit bench``'s load generator; every request's token count
  comes from the server's usage (``tokens_per_request`` shows that both sides really made 128).
- ``prefix_case``: one request (batch 1) whose start is a ~1,000-token shared "system prompt";
  TTFT with the prefix cached (the same text as an earlier request) and uncached (a different first
  token, so no prefix matches): vLLM's automatic prefix caching, llama.cpp's ``cache_prompt``.
- ``editing_case``: batch-1 decode speed of the editing workload (``toolkit.bench.workloads``: a
  ~440-token file and a rename request), with OpenAI's ``prediction`` = the file, or without.
  Decode speed is (completion tokens - 1) / (last chunk - first chunk): the first token is prefill.
"""

from __future__ import annotations

import statistics
from typing import Any

import httpx

from toolkit.bench.loadgen import LoadSpec, RequestRecord, request_body, run_http_bench, stream_request
from toolkit.bench.workloads import editing_chat_body

PREFIX_TOKENS = 1000


async def http_level(url: str, model: str, level: int, waves: int, prompt_tokens: int, max_tokens: int,
                     warmup: int = 1) -> dict[str, Any]:
    """One row of the HTTP table for one side: ``max(4, waves x level)`` requests at ``level`` streams."""
    result = (await run_http_bench(url, model, [level], requests_per_level=max(4, waves * level),
                                   prompt_tokens=prompt_tokens, max_tokens=max_tokens, ignore_eos=True,
                                   include_usage=True, warmup=warmup, timeout_s=1800.0, progress=True))[0]
    ok = result["requests"]
    result["tokens_per_request"] = result["output_tokens"] / ok if ok else None
    return result


def shared_prefix_text(lines: int) -> str:
    """A deterministic ~14-tokens-a-line "system prompt": numbered inventory lines (the golden long
    prompt's generator), so both servers and every run read the same bytes."""
    from toolkit.export.golden import inventory_line

    body = "\n".join(inventory_line(n) for n in range(1, lines + 1))
    return f"You answer questions about this inventory of lockers.\n\n{body}\n\n"


def prefix_lines_for(tokenize, target_tokens: int = PREFIX_TOKENS) -> tuple[int, int]:
    """The fewest lines whose shared prefix has at least ``target_tokens`` tokens by
    ``tokenize(text) -> count``, and that count."""
    lines, tokens = 1, tokenize(shared_prefix_text(1))
    while tokens < target_tokens:
        lines = max(lines + 1, int(lines * target_tokens / max(tokens, 1)))
        tokens = tokenize(shared_prefix_text(lines))
    while lines > 1:
        fewer = tokenize(shared_prefix_text(lines - 1))
        if fewer < target_tokens:
            break
        lines, tokens = lines - 1, fewer
    return lines, tokens


def prefix_prompt(shared: str, run: int, cached: bool) -> str:
    """Run ``run``'s prompt: the shared text as first sent (cached) or behind a different start
    (uncached: ``Run <k>.`` changes the first token), then a question of its own."""
    head = "" if cached else f"Run {run}. "
    return f"{head}{shared}Question {run}: which locker holds the most items? Answer:"


def ttft_ms(record: RequestRecord) -> float | None:
    """Client-side time to the first content chunk, or None when the request failed or sent none."""
    if record.error or not record.token_times:
        return None
    return (record.token_times[0] - record.start) * 1000


async def prefix_case(url: str, model: str, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    """One batch-1 streamed completion of ``prompt``: TTFT and the cached tokens the usage reports."""
    spec = LoadSpec(url, model, ignore_eos=True, include_usage=True)
    async with httpx.AsyncClient(timeout=600) as client:
        record = await stream_request(client, spec, request_body(spec, prompt, max_tokens))
    usage = record.usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_ms": ttft_ms(record), "cached_tokens": cached, "prompt_tokens": usage.get("prompt_tokens"),
            "error": record.error}


def decode_tok_s(record: RequestRecord) -> float | None:
    """(completion tokens - 1) / (last chunk - first chunk): decoding after the first token."""
    if record.error or len(record.token_times) < 2 or record.output_tokens < 2:
        return None
    span = record.token_times[-1] - record.token_times[0]
    return (record.output_tokens - 1) / span if span > 0 else None


async def editing_case(url: str, model: str, max_tokens: int, prediction: bool) -> dict[str, Any]:
    """One batch-1 streamed run of the editing workload, with or without ``prediction``."""
    spec = LoadSpec(url, model, route="chat")
    body = {**editing_chat_body(model, max_tokens, prediction=prediction), "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=600) as client:
        record = await stream_request(client, spec, body)
    usage = record.usage or {}
    details = usage.get("completion_tokens_details") or {}
    return {"decode_tok_s": decode_tok_s(record), "completion_tokens": record.output_tokens,
            "prompt_tokens": usage.get("prompt_tokens"), "chunks": len(record.token_times),
            "accepted_prediction_tokens": details.get("accepted_prediction_tokens"),
            "rejected_prediction_tokens": details.get("rejected_prediction_tokens"),
            "ttft_ms": ttft_ms(record), "text": record.text, "error": record.error}


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the rows that have it, else None."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None
