"""Tool calls in a whole (non-streamed) reply: the parsed call and the parser.

A reply that is done is parsed at once with ``json``: a JSON object (or array of objects),
optionally in a ```json fence, whose ``name`` is one of the tools becomes tool calls; anything
else stays text. Streamed replies are parsed as they are decoded by ``server/tool_stream.py``,
which yields the same :class:`ToolCall`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One parsed call: the tool name and its arguments object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON string OpenAI sends (``"{}"`` when there are none)."""
        return json.dumps(self.arguments, ensure_ascii=False)


def parse_tool_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """Parse ``{"name", "arguments"}`` (or a list of them), optionally in a ```json fence."""
    body = _strip_fence(text.strip())
    if not body or body[0] not in "{[":
        return None
    try:
        data, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return None
    if body[end:].strip():
        return None
    items = data if isinstance(data, list) else [data]
    calls = [_to_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _strip_fence(text: str) -> str:
    if text.startswith("```"):
        text = text[3:]
        text = text[4:] if text.startswith("json") else text
        text = text.rsplit("```", 1)[0] if "```" in text else text
    return text.strip()


def _to_call(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(item["name"], args)
