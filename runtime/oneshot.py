"""``toolkit generate``: run one request through an engine and stream its text to a writer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TextIO

from toolkit.runtime.sampling_params import SamplingParams
from toolkit.runtime.types import GenerateRequest


async def _stream(engine_dir: Path, request: GenerateRequest, out: TextIO) -> tuple[str, int, int]:
    from toolkit.runtime import load_engine

    engine = load_engine(engine_dir)
    await engine.start()
    reason, prompt_tokens, completion_tokens = "", 0, 0
    try:
        async for output in await engine.generate(request):
            for choice in output.choices:
                out.write(choice.text)
                out.flush()
                reason = choice.finish_reason or reason
            prompt_tokens, completion_tokens = output.prompt_tokens, output.completion_tokens
    finally:
        await engine.stop()
    return reason, prompt_tokens, completion_tokens


def generate_once(engine_dir: Path, request: GenerateRequest, out: TextIO) -> tuple[str, int, int]:
    """Stream one request's text to ``out``; returns (finish_reason, prompt_tokens, completion_tokens)."""
    return asyncio.run(_stream(engine_dir, request, out))


def build_request(prompt: str | None, messages: list[dict] | None, raw: bool, **sampling) -> GenerateRequest:
    """A request from CLI values; ``None`` sampling values take the SamplingParams defaults."""
    return GenerateRequest(params=SamplingParams.with_defaults(**sampling), prompt=prompt, messages=messages, raw=raw)
