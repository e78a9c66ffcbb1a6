"""Render chat messages into a model's prompt text, with each family's quirks.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}`` dicts. The rendered
text already contains the BOS marker, so tokenize it with ``add_special_tokens=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Message = dict[str, str]


class ChatFormatError(ValueError):
    """The messages cannot be rendered in this model's chat format."""


def _check_roles(messages: Sequence[Message], allowed: set[str]) -> None:
    if not messages:
        raise ChatFormatError("messages must contain at least one message")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in allowed:
            raise ChatFormatError(f"messages[{i}].role must be one of {sorted(allowed)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"messages[{i}].content must be a string")


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    """Gemma has no system role: prepend system text to the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            turns.insert(0, {"role": "user", "content": system})
        else:
            first_user["content"] = f"{system}\n\n{first_user['content']}"
    return turns


def render_gemma(messages: Sequence[Message]) -> str:
    """Gemma / CodeGemma / Gemma 3 turn format; the system message is folded into the first user turn."""
    _check_roles(messages, {"system", "user", "assistant"})
    parts = ["<bos>"]
    for turn in _fold_system(messages):
        role = "model" if turn["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{turn['content']}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


def render_chatml(messages: Sequence[Message]) -> str:
    """Qwen2's ChatML, with Qwen2's default system prompt when none is given."""
    _check_roles(messages, {"system", "user", "assistant"})
    turns = list(messages)
    if turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
    return body + "<|im_start|>assistant\n"


def render_codellama70b(messages: Sequence[Message]) -> str:
    """CodeLlama-70B-Instruct's ``Source: ... <step>`` format (its own chat template)."""
    _check_roles(messages, {"system", "user", "assistant"})
    parts = ["<s>"]
    for message in messages:
        parts.append(f"Source: {message['role']}\n\n {message['content'].strip()} <step> ")
    parts.append("Source: assistant\nDestination: user\n\n ")
    return "".join(parts)


FORMATS: dict[str, Callable[[Sequence[Message]], str]] = {
    "gemma": render_gemma,
    "chatml": render_chatml,
    "codellama70b": render_codellama70b,
}

BOS_TEXT = {"gemma": "<bos>", "chatml": "", "codellama70b": "<s>"}


def render_chat(chat_format: str, messages: Sequence[Message]) -> str:
    """Render ``messages`` with the named chat format (see ``FORMATS``)."""
    try:
        render = FORMATS[chat_format]
    except KeyError:
        raise ChatFormatError(f"unknown chat format {chat_format!r}; known: {sorted(FORMATS)}") from None
    return render(messages)


def render_raw_prompt(chat_format: str, prompt: str) -> str:
    """A plain (non-chat) prompt with the format's BOS marker in front."""
    return BOS_TEXT.get(chat_format, "") + prompt


def render_fim(chat_format: str, template: str, prefix: str, suffix: str) -> str:
    """A fill-in-the-middle prompt: the format's BOS marker, then ``template`` with ``{prefix}`` and ``{suffix}``.

    Raises ``ChatFormatError`` when the recipe has no FIM template.
    """
    if not template:
        raise ChatFormatError("this model has no fill-in-the-middle prompt format")
    return BOS_TEXT.get(chat_format, "") + template.replace("{prefix}", prefix, 1).replace("{suffix}", suffix, 1)
