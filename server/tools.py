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


@dataclass
class ToolCallStart:
    """Stream event: call ``index`` begins (its id and name are known)."""

    index: int
    id: str
    name: str


@dataclass
class ArgumentsFragment:
    """Stream event: the next piece of call ``index``'s arguments JSON."""

    index: int
    text: str


@dataclass
class TextPiece:
    """Stream event: plain reply text (and the extras, e.g. logprobs, that came with it)."""

    text: str
    extras: list[Any] = field(default_factory=list)


StreamEvent = ToolCallStart | ArgumentsFragment | TextPiece
_FENCE = "```json"
_ARGUMENT_KEYS = ("arguments", "parameters")


class ToolCallStreamer:
    """Streaming parser of one choice's reply: plain text, or tool calls as they are decoded.

    The reply is a tool call when its first non-space characters open a JSON object or array
    (optionally in a ```json fence) whose first call names one of the tools; until that is
    known (the first key and the name) the text is held back, then the call's id and name leave
    at once and its arguments leave fragment by fragment as they are fed. The fragments of each
    call always join into a JSON object: a backslash escape or a trailing comma is held until
    what follows it shows it is complete, and when the reply ends early or breaks the JSON
    syntax, :meth:`finish` sends the shortest closing text (closing strings, finishing numbers
    and literals, closing containers). Unconstrained replies (``auto``) may break off that way;
    ``required``/named replies are schema-constrained and complete.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.names = {t.name for t in plan.tools} if plan.active else set()
        self.mode = "undecided" if self.names else "text"  # undecided | text | call | done
        self.held = ""
        self.held_extras: list[Any] = []
        self.calls: list[ToolCall] = []  # started calls; arguments filled in by finish()
        self._args: list[str] = []  # the arguments text sent so far, per call
        self._scan = _CallScanner()

    @property
    def is_call(self) -> bool:
        """True once a tool call has started (the reply is no longer text)."""
        return bool(self.calls)

    def feed(self, text: str, extras: Sequence[Any] = ()) -> list[StreamEvent]:
        """The events ``text`` produces now."""
        if self.mode == "text":
            return [TextPiece(text, list(extras))] if text or extras else []
        if self.mode == "done":
            return []
        self.held += text
        self.held_extras.extend(extras)
        if self.mode == "undecided":
            start = _call_start(self.held)
            if start is None:
                return []
            if start < 0:
                return self._as_text()
            self.mode = "call"
            return self._scan_feed(self.held[start:])
        return self._scan_feed(text)

    def _scan_feed(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for ch in text:
            self._scan.push(ch)
            events.extend(self._drain())
            if self._scan.state in ("broken", "end"):
                break
        if self._scan.state == "broken" and not self.calls:
            return self._as_text()
        if self._scan.state in ("broken", "end"):
            self.mode = "done"
        return _merge_fragments(events)

    def _drain(self) -> list[StreamEvent]:
        """Events for what the scanner has recognised so far."""
        scan, events = self._scan, []
        if scan.name_ready is not None:
            name, scan.name_ready = scan.name_ready, None
            if name not in self.names:
                scan.state = "broken"
                return events
            call = ToolCall(name, {})
            self.calls.append(call)
            self._args.append("")
            events.append(ToolCallStart(len(self.calls) - 1, call.id, name))
        if self.calls and len(self.calls) == scan.calls_named:
            fragment = scan.take_arguments()
            if fragment:
                self._args[-1] += fragment
                events.append(ArgumentsFragment(len(self.calls) - 1, fragment))
        return events

    def _as_text(self) -> list[StreamEvent]:
        self.mode = "text"
        text, extras = self.held, self.held_extras
        self.held, self.held_extras = "", []
        return [TextPiece(text, extras)] if text or extras else []

    def finish(self) -> list[StreamEvent]:
        """At the end of the choice: held text, or the closing fragment of the last call.

        After it, :attr:`calls` holds each started call with its parsed arguments."""
        if self.mode in ("undecided",) or (self.mode in ("call", "done") and not self.calls):
            return self._as_text()
        if self.mode == "text":
            return []
        events: list[StreamEvent] = []
        if self.mode == "call" and len(self.calls) == self._scan.calls_named:
            fragment = self._scan.take_arguments()
            if fragment:
                self._args[-1] += fragment
                events.append(ArgumentsFragment(len(self.calls) - 1, fragment))
        for index, call in enumerate(self.calls):
            closing = complete_json(self._args[index]) if self._args[index] else "{}"
            if closing:
                self._args[index] += closing
                events.append(ArgumentsFragment(index, closing))
            args = json.loads(self._args[index])
            call.arguments = args if isinstance(args, dict) else {}
        self.mode = "done"
        return events


def _merge_fragments(events: list[StreamEvent]) -> list[StreamEvent]:
    """One fragment per call and feed: consecutive fragments of the same call joined."""
    out: list[StreamEvent] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, ArgumentsFragment) and isinstance(last, ArgumentsFragment) \
                and last.index == event.index:
            out[-1] = ArgumentsFragment(event.index, last.text + event.text)
        else:
            out.append(event)
    return out


class _CallScanner:
    """Character-level scanner of ``{"name": ..., "arguments": {...}}`` or a list of them.

    ``state`` is ``broken`` on anything else and ``end`` after the last call; ``name_ready``
    is set when a call's name string is complete, and the arguments text seen so far (except a
    tail that may still turn out incomplete) is taken with :meth:`take_arguments`.
    """

    def __init__(self) -> None:
        self.state = "top"
        self.array = False
        self.calls_named = 0
        self.name_ready: str | None = None
        self._key = ""
        self._string = ""
        self._escape = False
        self._value: _JsonPrefix | None = None
        self._value_key = ""
        self._name: str | None = None
        self._pending_args: str | None = None  # arguments seen before the name
        self._args_sent = 0

    def push(self, ch: str) -> None:
        state = self.state
        if state in ("broken", "end"):
            return
        if state == "value":
            self._push_value(ch)
            return
        if state in ("key", "name"):
            self._push_string(ch)
            return
        if ch.isspace():
            return
        if state == "top":
            if ch == "[" and not self.array:
                self.array = True
            elif ch == "{":
                self._open_call()
            else:
                self.state = "broken"
        elif state == "key_or_end":
            if ch == '"':
                self.state, self._string = "key", ""
            elif ch == "}" and self._first_key_done:
                self._close_call()
            else:
                self.state = "broken"
        elif state == "colon":
            self.state = "value_start" if ch == ":" else "broken"
        elif state == "value_start":
            if self._key == "name":
                if ch == '"':
                    self.state, self._string = "name", ""
                else:
                    self.state = "broken"
            elif self._key in _ARGUMENT_KEYS or self._first_key_done:
                self._value, self._value_key, self.state = _JsonPrefix(), self._key, "value"
                self._push_value(ch)
            else:
                self.state = "broken"
        elif state == "after_value":
            if ch == ",":
                self.state, self._first_key_done = "key_or_end", True
            elif ch == "}":
                self._close_call()
            else:
                self.state = "broken"
        elif state == "between_calls":
            if ch == "," and self.array:
                self.state = "next_call"
            elif ch == "]" and self.array:
                self.state = "end"
            else:
                self.state = "broken"
        elif state == "next_call":
            self._open_call() if ch == "{" else setattr(self, "state", "broken")

    def _open_call(self) -> None:
        self.state, self._first_key_done = "key_or_end", False
        self._name, self._pending_args, self._args_sent = None, None, 0
        self._value = None

    def _close_call(self) -> None:
        if self._name is None:
            self.state = "broken"
            return
        self.state = "between_calls" if self.array else "end"

    def _push_string(self, ch: str) -> None:
        if self._escape:
            self._string += "\\" + ch
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            try:
                text = json.loads('"' + self._string + '"')
            except ValueError:
                self.state = "broken"
                return
            if self.state == "key":
                if not self._first_key_done and text not in ("name", *_ARGUMENT_KEYS):
                    self.state = "broken"  # a JSON reply, not a call
                    return
                self._key, self.state = text, "colon"
            else:
                self._name, self.name_ready = text, text
                self.calls_named += 1
                self._first_key_done = True
                self.state = "after_value"
        else:
            self._string += ch

    def _push_value(self, ch: str) -> None:
        value = self._value
        if not value.push(ch):
            if value.complete:  # the character after the value
                self._end_value()
                self.state = "after_value"
                self.push(ch)
            else:
                self.state = "broken"
            return
        if value.complete and value.closed:
            self._end_value()
            self.state = "after_value"

    def _end_value(self) -> None:
        self._first_key_done = True
        if self._value_key in _ARGUMENT_KEYS and self._name is None:
            self._pending_args = self._value.text
        self._value_key = self._value_key if self._value_key in _ARGUMENT_KEYS else ""

    def take_arguments(self) -> str:
        """Arguments text of the current call not yet taken (only once its name is known)."""
        if self._name is None:
            return ""
        if self._pending_args is not None:
            text, self._pending_args = self._pending_args, None
            self._args_sent = len(text)
            return text if text.startswith("{") else ""
        value = self._value
        if value is None or self._value_key not in _ARGUMENT_KEYS or not value.text.startswith("{"):
            return ""
        safe = value.safe_length()
        text = value.text[self._args_sent:safe]
        self._args_sent = max(self._args_sent, safe)
        return text


class _JsonPrefix:
    """Incremental checker of one JSON value's text: is it still a valid prefix, is it complete,
    and which closing text completes it (see :func:`complete_json`)."""

    def __init__(self) -> None:
        self.text = ""
        self.stack: list[str] = []  # "{" / "[" of the open containers
        self.expect = "value"  # value | key_or_close | key | colon | comma_or_close | value_or_close
        self.token = ""  # a number or literal being read
        self.in_string = False
        self.is_key = False
        self.escape = 0  # characters of an escape still to come (1, or 4 after \u)
        self.complete = False
        self.closed = False  # the value ended with a string/container close (not a number)
        self._escape_start = 0
        self._comma_at = -1

    def push(self, ch: str) -> bool:
        """Add ``ch``; False (and nothing changed) when it cannot follow."""
        if self.complete and (self.closed or not self._continues_token(ch)):
            return False
        ok = self._step(ch)
        if ok:
            self.text += ch
        return ok

    def _continues_token(self, ch: str) -> bool:
        return bool(self.token) and (ch.isdigit() or ch in ".eE+-" or ch.isalpha())

    def _step(self, ch: str) -> bool:
        if self.in_string:
            return self._string_char(ch)
        if self.token:
            if ch.isalnum() or ch in ".+-":
                candidate = self.token + ch
                if _token_prefix(candidate):
                    self.token = candidate
                    self.complete = not self.stack and _token_complete(candidate)
                    return True
                return False
            if not _token_complete(self.token):
                return False
            self.token = ""
            self._after_value()
            if not self.stack:
                return False
        if ch.isspace():
            return not self.complete
        if ch != ",":
            self._comma_at = -1
        exp = self.expect
        if ch == '"':
            if exp in ("value", "value_or_close"):
                self.in_string, self.is_key = True, False
                return True
            if exp in ("key", "key_or_close"):
                self.in_string, self.is_key = True, True
                return True
            return False
        if ch in "{[":
            if exp not in ("value", "value_or_close"):
                return False
            self.stack.append(ch)
            self.expect = "key_or_close" if ch == "{" else "value_or_close"
            return True
        if ch in "}]":
            want = "{" if ch == "}" else "["
            if not self.stack or self.stack[-1] != want:
                return False
            if exp not in ("key_or_close", "value_or_close", "comma_or_close"):
                return False
            self.stack.pop()
            self._after_value(closed=True)
            return True
        if ch == ",":
            if exp != "comma_or_close":
                return False
            self.expect = "key" if self.stack[-1] == "{" else "value"
            self._comma_at = len(self.text)
            return True
        if ch == ":":
            if exp != "colon":
                return False
            self.expect = "value"
            return True
        if exp in ("value", "value_or_close") and (ch.isdigit() or ch in "-tfn"):
            if not _token_prefix(ch):
                return False
            self.token = ch
            self.complete = not self.stack and _token_complete(ch)
            return True
        return False

    def _string_char(self, ch: str) -> bool:
        if self.escape:
            if self.escape == 5:  # just after the backslash
                if ch == "u":
                    self.escape = 4
                    return True
                if ch not in '"\\/bfnrt':
                    return False
                self.escape = 0
                return True
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.escape -= 1
            return True
        if ch == "\\":
            self.escape, self._escape_start = 5, len(self.text)
            return True
        if ch == '"':
            self.in_string = False
            if self.is_key:
                self.expect = "colon"
            else:
                self._after_value(closed=True)
            return True
        return ord(ch) >= 0x20

    def _after_value(self, closed: bool = False) -> None:
        if self.stack:
            self.expect = "comma_or_close"
        else:
            self.complete, self.closed = True, closed

    def safe_length(self) -> int:
        """How much of :attr:`text` can be sent now and still be completed by appending."""
        if self.in_string and self.escape:
            return self._escape_start
        if self.expect in ("key", "value") and self._comma_at >= 0 and not self.in_string and not self.token:
            return self._comma_at  # a dangling comma: held until the next key or value
        return len(self.text)

    def closing(self) -> str:
        """The text that completes what :meth:`safe_length` allows to send."""
        out = ""
        if self.in_string:
            out += '"'
            if self.is_key:
                out += ": null"
        elif self.token:
            out += _finish_token(self.token)
        elif self.expect == "colon":
            out += ": null"
        elif self.expect == "value" and self.stack:
            out += "null"
        for opener in reversed(self.stack):
            out += "}" if opener == "{" else "]"
        return out


def _token_prefix(token: str) -> bool:
    """True when ``token`` can begin a JSON number or literal."""
    if token[0] in "tfn":
        return any(word.startswith(token) for word in ("true", "false", "null"))
    import re

    return re.fullmatch(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?", token) is not None and (
        token[0] != "-" or len(token) == 1 or token[1].isdigit())


def _token_complete(token: str) -> bool:
    if token in ("true", "false", "null"):
        return True
    import re

    return re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", token) is not None


def _finish_token(token: str) -> str:
    for word in ("true", "false", "null"):
        if word.startswith(token):
            return word[len(token):]
    return "" if _token_complete(token) else "0"


def complete_json(prefix: str) -> str | None:
    """The shortest text that makes the JSON value prefix ``prefix`` complete ("" if it is),
    or None when ``prefix`` is not a JSON value prefix that appending can repair (e.g. it ends
    in a dangling comma or half an escape: hold those back, see ``_JsonPrefix.safe_length``)."""
    value = _JsonPrefix()
    for ch in prefix.lstrip():
        if not value.push(ch):
            return None
    if value.complete:
        return _finish_token(value.token) if value.token else ""
    if value.safe_length() != len(value.text):
        return None
    return value.closing() if value.text else None


def _call_start(held: str) -> int | None:
    """Where the JSON of a tool call starts in the held text: -1 if it is text, None if unknown."""
    stripped = held.lstrip()
    if not stripped:
        return None
    offset = len(held) - len(stripped)
    if stripped[0] in "{[":
        return offset
    if stripped[0] != "`":
        return -1
    if len(stripped) < len(_FENCE):
        return None if _FENCE.startswith(stripped) else -1
    if not stripped.startswith(_FENCE):
        return -1
    body = stripped[len(_FENCE):]
    rest = body.lstrip()
    if not rest:
        return None
    return offset + len(_FENCE) + (len(body) - len(rest)) if rest[0] in "{[" else -1


class HoldBack:
    """Streaming filter for one choice that sends tool calls only at the end (Workers AI).

    ``feed`` returns the text (and the extras, e.g. logprobs, that came with it) to send now, or
    None while the reply is held back; ``finish`` returns the tool calls, or the held text.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.streamer = ToolCallStreamer(plan)

    def feed(self, text: str, extras: Sequence[Any] = ()) -> tuple[str, list[Any]] | None:
        """Text to send now, or None while a possible tool call is held back."""
        events = [e for e in self.streamer.feed(text, extras) if isinstance(e, TextPiece)]
        if not events:
            return None
        return "".join(e.text for e in events), [x for e in events for x in e.extras]

    def finish(self) -> tuple[list[ToolCall] | None, str, list[Any]]:
        """At the end of the choice: ``(tool calls or None, held text, held extras)``."""
        events = self.streamer.finish()
        if self.streamer.is_call:
            return self.streamer.calls, "", []
        text = [e for e in events if isinstance(e, TextPiece)]
        return None, "".join(e.text for e in text), [x for e in text for x in e.extras]


def could_be_tool_call(prefix: str) -> bool | None:
    """For streaming: True if the reply so far may be a tool call, False if it is text, None if unknown."""
    start = _call_start(prefix)
    return None if start is None else start >= 0


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
