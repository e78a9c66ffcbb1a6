"""Tool calling in a generic, documented prompt format shared by both APIs.

The recipes' chat formats (Gemma, ChatML, CodeLlama-70B) have no tool syntax, so tools are
rendered as a system preamble:

    You have access to the following tools:
    [{"name": "get_weather", "description": "...", "parameters": {...JSON schema...}}]

    To call a tool, reply with only a JSON object of the form {"name": "<tool name>",
    "arguments": {...}} and no other text; to call several tools, reply with a JSON array of
    such objects. <choice line>

The preamble is prepended to the system message (or becomes one; Gemma folds it into the
first user turn). The model's whole reply is then parsed: a JSON object (or array of objects)
whose ``name`` is one of the tools becomes ``tool_calls``; anything else stays text.

``tool_choice``: ``none`` renders no tools and parses nothing; ``auto`` lets the model choose;
``required`` and a named tool constrain decoding with ``SamplingParams.json_schema`` (the schema
of ``{"name": const, "arguments": <the tool's parameters>}``), so the arguments always parse.
Past turns are rendered the same way: an assistant tool call becomes its JSON, and a tool
result becomes a user turn ``Tool result (<name>): <content>``.

This module holds the request side: the tools, the plan, the preamble and the decoding
constraint, and how past calls and results are written back. Parsing a whole reply lives in
``server/tool_parse.py``, parsing a streamed one in ``server/tool_stream.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.server.errors import invalid
from toolkit.server.tool_parse import ToolCall, parse_tool_calls

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_CHOICE_LINES = {
    "auto": "If no tool is needed, answer the user directly in plain text.",
    "required": "You must call at least one of these tools.",
}


@dataclass(frozen=True)
class ToolSpec:
    """One callable tool: its name, description and JSON-schema parameters (None: no parameters)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class ToolPlan:
    """The tools of one request and how the model may use them."""

    tools: tuple[ToolSpec, ...] = ()
    mode: str = "none"  # none | auto | required | named
    forced: str | None = None

    @property
    def active(self) -> bool:
        """True when tools are rendered into the prompt and the reply is parsed."""
        return bool(self.tools) and self.mode != "none"

    def preamble(self) -> str:
        """The system text that lists the tools and says how to call them."""
        listing = json.dumps([_describe(t) for t in self.tools], ensure_ascii=False)
        if self.mode == "named":
            choice = f'You must call the tool "{self.forced}".'
        else:
            choice = _CHOICE_LINES[self.mode]
        return ("You have access to the following tools:\n" + listing + "\n\n"
                'To call a tool, reply with only a JSON object of the form {"name": "<tool name>", '
                '"arguments": {...}} and no other text; to call several tools, reply with a JSON array '
                "of such objects. " + choice)

    def json_schema(self) -> dict[str, Any] | None:
        """The decoding constraint for ``required`` / named tool choice, else None."""
        if self.mode == "named":
            return _call_schema(next(t for t in self.tools if t.name == self.forced))
        if self.mode == "required":
            schemas = [_call_schema(t) for t in self.tools]
            return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return None

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages with the tool preamble merged into (or inserted as) the system message."""
        if not self.active:
            return messages
        out = [dict(m) for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{self.preamble()}\n\n{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": self.preamble()})
        return out

    def parse(self, text: str) -> list[ToolCall] | None:
        """The tool calls in the model's whole reply, or None when it is plain text."""
        if not self.active:
            return None
        return parse_tool_calls(text, {t.name for t in self.tools})


def make_plan(tools: Sequence[ToolSpec], choice: str | None, forced: str | None = None) -> ToolPlan:
    """Validate ``tool_choice`` against the tools (``choice`` none/auto/required/named)."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tool names must be unique", "tools")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice in ("required", "named") and not tools:
        raise invalid(f"tool_choice {forced or choice!r} needs a non-empty 'tools' list", "tool_choice")
    if choice == "named" and forced not in names:
        raise invalid(f"tool_choice names the tool {forced!r}, which is not in 'tools' ({', '.join(names)})",
                      "tool_choice")
    return ToolPlan(tuple(tools), choice, forced)


def tool_call_text(calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """How a past assistant tool call is written back into the prompt."""
    items = [{"name": name, "arguments": args} for name, args in calls]
    return json.dumps(items[0] if len(items) == 1 else items, ensure_ascii=False)


def tool_result_text(name: str | None, content: str) -> str:
    """How a tool result message is written into the prompt (as a user turn)."""
    return f"Tool result ({name or 'tool'}): {content}"


def _describe(tool: ToolSpec) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": tool.parameters or {}}


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    params = tool.parameters if tool.parameters and tool.parameters.get("properties") else EMPTY_PARAMETERS
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
