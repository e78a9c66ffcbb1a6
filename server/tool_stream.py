"""Tool calls in a streamed reply: decide early whether it is a call, then send it as decoded.

A streamed choice cannot wait for the whole reply: plain text should leave at once, and a call's
id and name as soon as they are known, its arguments fragment by fragment. :class:`ToolCallStreamer`
holds back only the start of a reply that may be a call (JSON or a ```json fence), uses
``server/tool_scan.py`` to recognise the call and ``server/json_close.py`` to keep every
fragment completable and to close it at the end; OpenAI streams its events as deltas
(``server/openai/stream.py``). :class:`HoldBack` is the same parser for Workers AI, which sends
tool calls only at the end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.server.json_close import complete_json
from toolkit.server.tool_parse import ToolCall
from toolkit.server.tool_scan import CallScanner
from toolkit.server.tools import ToolPlan


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
        self._scan = CallScanner()

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
        return events + self._take_arguments()

    def _take_arguments(self) -> list[StreamEvent]:
        """The fragment of the last call's arguments the scanner can release now, if any."""
        if not self.calls or len(self.calls) != self._scan.calls_named:
            return []
        fragment = self._scan.take_arguments()
        if self._scan.state == "broken":  # the reply broke the JSON: send only what can still be closed
            fragment = _completable_start(self._args[-1], fragment)
        if not fragment:
            return []
        self._args[-1] += fragment
        return [ArgumentsFragment(len(self.calls) - 1, fragment)]

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
        events = self._take_arguments() if self.mode == "call" else []
        for index, call in enumerate(self.calls):
            closing = complete_json(self._args[index]) if self._args[index] else "{}"
            if closing:
                self._args[index] += closing
                events.append(ArgumentsFragment(index, closing))
            args = json.loads(self._args[index])
            call.arguments = args if isinstance(args, dict) else {}
        self.mode = "done"
        return events


def _completable_start(sent: str, fragment: str) -> str:
    """The longest start of ``fragment`` after which the arguments sent so far can still be closed.

    A comma is released once the next character arrives; when that character breaks the JSON
    (``[1,s``), the comma must not leave, or no closing text could make the arguments parse.
    """
    for end in range(len(fragment), -1, -1):
        if complete_json(sent + fragment[:end]) is not None:
            return fragment[:end]
    return ""


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


def could_be_tool_call(prefix: str) -> bool | None:
    """For streaming: True if the reply so far may be a tool call, False if it is text, None if unknown."""
    start = _call_start(prefix)
    return None if start is None else start >= 0


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
        return _joined(events)

    def finish(self) -> tuple[list[ToolCall] | None, str, list[Any]]:
        """At the end of the choice: ``(tool calls or None, held text, held extras)``."""
        events = self.streamer.finish()
        if self.streamer.is_call:
            return self.streamer.calls, "", []
        return (None, *_joined([e for e in events if isinstance(e, TextPiece)]))


def _joined(pieces: list[TextPiece]) -> tuple[str, list[Any]]:
    """The text and the extras of ``pieces``, each joined in order."""
    return "".join(p.text for p in pieces), [x for p in pieces for x in p.extras]
