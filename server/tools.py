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
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.server.errors import invalid

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


class HoldBack:
    """Streaming filter for one choice: text passes through unless the reply may be a tool call.

    ``feed`` returns the text (and the extras, e.g. logprobs, that came with it) to send now, or
    None while the reply is held back; ``finish`` returns the tool calls, or the held text.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.mode = "undecided" if plan.active else "text"
        self.buffer = ""
        self.extras: list[Any] = []

    def feed(self, text: str, extras: Sequence[Any] = ()) -> tuple[str, list[Any]] | None:
        """Text to send now, or None while a possible tool call is held back."""
        if self.mode == "text":
            return text, list(extras)
        self.buffer += text
        self.extras.extend(extras)
        if self.mode == "undecided":
            decision = could_be_tool_call(self.buffer)
            if decision is False:
                self.mode = "text"
                held = (self.buffer, self.extras)
                self.buffer, self.extras = "", []
                return held
            if decision:
                self.mode = "buffer"
        return None

    def finish(self) -> tuple[list[ToolCall] | None, str, list[Any]]:
        """At the end of the choice: ``(tool calls or None, held text, held extras)``."""
        calls = self.plan.parse(self.buffer) if self.mode != "text" else None
        held = (self.buffer, self.extras)
        self.buffer, self.extras = "", []
        return (calls, "", []) if calls else (None, *held)


def could_be_tool_call(prefix: str) -> bool | None:
    """For streaming: True if the reply so far may be a tool call, False if it is text, None if unknown."""
    stripped = prefix.lstrip()
    if not stripped:
        return None
    return stripped[0] in "{[`"


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
