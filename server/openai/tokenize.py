"""vLLM's tokenizer endpoints: ``POST /tokenize`` and ``POST /detokenize`` (request and response shapes of
vLLM's ``TokenizeCompletionRequest`` / ``TokenizeChatRequest`` / ``DetokenizeRequest``).

The ids are exactly what a completion or chat request would send to the engine: a prompt is
rendered as ``/v1/completions`` renders it (the recipe's BOS in front unless ``add_special_tokens``
is false), messages with the recipe's chat template and generation prompt (``engine.prompts.encode``).
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct
from toolkit.server.errors import invalid
from toolkit.server.openai.adapter import chat_messages
from toolkit.server.openai.schemas import ChatMessage
from toolkit.server.registry import ModelEntry


class TokenizeRequest(Struct, kw_only=True):
    """``{model, prompt}`` or ``{model, messages, add_generation_prompt?}``."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True):
    """``{model, tokens}``."""

    model: str
    tokens: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=1_000_000)]


def tokenize_body(req: TokenizeRequest, entry: ModelEntry) -> dict[str, Any]:
    """``{count, max_model_len, tokens}`` (and ``token_strs`` when asked)."""
    prompts = entry.engine.prompts
    if (req.prompt is None) == (req.messages is None):
        raise invalid("send exactly one of 'prompt' or 'messages'", "prompt" if req.prompt is not None else "messages")
    if req.messages is not None:
        if not req.add_generation_prompt:
            raise invalid("add_generation_prompt=false is not supported: the chat formats always end with the "
                          "assistant's turn opening", "add_generation_prompt")
        tokens = prompts.encode(messages=chat_messages(req.messages))
    else:
        if not req.prompt:
            raise invalid("prompt must not be empty", "prompt")
        tokens = prompts.encode(prompt=req.prompt, raw=not req.add_special_tokens)
    body: dict[str, Any] = {"count": len(tokens), "max_model_len": entry.context_length, "tokens": list(tokens)}
    if req.return_token_strs:
        body["token_strs"] = [prompts.token_text(t) for t in tokens]
    return body


def detokenize_body(req: DetokenizeRequest, entry: ModelEntry) -> dict[str, Any]:
    """``{prompt}``: the text of the ids, special tokens kept (ids outside the vocabulary are a 400 naming tokens)."""
    prompts = entry.engine.prompts
    if req.tokens and max(req.tokens) >= prompts.vocab_size:
        raise invalid(f"tokens must be ids in [0, {prompts.vocab_size})", "tokens")
    return {"prompt": prompts.detokenize(req.tokens)}
