"""Pure state machines: engine outputs → OpenAI stream chunks (as dicts, in the reference's key order).

Chat: every content delta carries ``{"role": "assistant", "content": ...}`` (as the reference
stream does; the first one therefore opens with the role), then one chunk per choice with an
empty delta and the ``finish_reason``. With ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with ``"choices": []`` and the usage follows; without it
no chunk has a ``usage`` key. When tools are active, a reply whose first non-space characters
open JSON is held back only until its first key and tool name show whether it is a call
(``server/tool_stream.py`` ``ToolCallStreamer``); a call then leaves at once as OpenAI's deltas:
first ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``, then
``{"index", "function": {"arguments": fragment}}`` per decoded piece, the fragments joining into
the arguments JSON, and the choice ends with ``finish_reason`` ``tool_calls``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.runtime.types import RequestOutput, TokenLogprob
from toolkit.server.openai.responses import ResponseMeta, chat_logprobs, completion_logprobs, echo_of, finish_reason
from toolkit.server.tool_stream import ArgumentsFragment, StreamEvent, TextPiece, ToolCallStart, ToolCallStreamer
from toolkit.server.tools import ToolPlan


@dataclass
class _Choice:
    started: bool = False
    finished: bool = False
    offset: int = 0
    calls: ToolCallStreamer | None = None


class _Stream:
    def __init__(self, meta: ResponseMeta, obj: str, n: int, want_logprobs: bool, include_usage: bool) -> None:
        self.meta = meta
        self.obj = obj
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self.states = [_Choice() for _ in range(n)]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.meta.id, "object": self.obj, "created": self.meta.created,
                                 "model": self.meta.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def final(self, usage_body: dict[str, Any]) -> list[dict[str, Any]]:
        """Close choices the engine left open, then the usage chunk when asked for."""
        chunks = []
        for index, state in enumerate(self.states):
            if not state.finished:
                chunks.extend(self._end(index, None))
        if self.include_usage:
            chunks.append({"id": self.meta.id, "object": self.obj, "created": self.meta.created,
                           "model": self.meta.model, "choices": [], "usage": usage_body})
        return chunks

    def _end(self, index: int, reason: str | None) -> list[dict[str, Any]]:
        raise NotImplementedError


class ChatStream(_Stream):
    """``chat.completion.chunk`` events of one request."""

    def __init__(self, meta: ResponseMeta, n: int, tools: ToolPlan, want_logprobs: bool,
                 include_usage: bool) -> None:
        super().__init__(meta, "chat.completion.chunk", n, want_logprobs, include_usage)
        for state in self.states:
            state.calls = ToolCallStreamer(tools)

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The chunks one engine output produces."""
        chunks = []
        for delta in output.choices:
            state = self.states[delta.index]
            if state.finished:
                continue
            chunks.extend(self._events(delta.index, state.calls.feed(delta.text, delta.logprobs or ())))
            if not state.started and state.calls.mode == "text":
                chunks.append(self._content(delta.index, "", []))
            if delta.finish_reason:
                chunks.extend(self._end(delta.index, delta.finish_reason))
        return chunks

    def _events(self, index: int, events: list[StreamEvent]) -> list[dict[str, Any]]:
        state, chunks = self.states[index], []
        for event in events:
            if isinstance(event, TextPiece):
                chunks.append(self._content(index, event.text, event.extras))
                continue
            if isinstance(event, ToolCallStart):
                call = {"index": event.index, "id": event.id, "type": "function",
                        "function": {"name": event.name, "arguments": ""}}
                delta: dict[str, Any] = {"tool_calls": [call]} if state.started else \
                    {"role": "assistant", "content": None, "tool_calls": [call]}
                state.started = True
            else:
                assert isinstance(event, ArgumentsFragment)
                delta = {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
            chunks.append(self._chunk([{"index": index, "delta": delta, "finish_reason": None}]))
        return chunks

    def _content(self, index: int, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        self.states[index].started = True
        choice: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": text}}
        if self.want_logprobs:
            choice["logprobs"] = chat_logprobs(logprobs) if logprobs else None
        choice["finish_reason"] = None
        return self._chunk([choice])

    def _end(self, index: int, reason: str | None) -> list[dict[str, Any]]:
        state = self.states[index]
        state.finished = True
        chunks = self._events(index, state.calls.finish())
        if state.calls.is_call:
            reason = "tool_calls"
        elif not state.started:
            chunks.append(self._content(index, "", []))
        choice: dict[str, Any] = {"index": index, "delta": {}}
        if self.want_logprobs:
            choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(reason)
        chunks.append(self._chunk([choice]))
        return chunks


class CompletionStream(_Stream):
    """``text_completion`` events of one request (``echo`` prefixes the first chunk)."""

    def __init__(self, meta: ResponseMeta, n: int, want_logprobs: bool, include_usage: bool,
                 echo: str | list[str | None] | None) -> None:
        super().__init__(meta, "text_completion", n, want_logprobs, include_usage)
        self.echo = echo  # one text, or one per choice (a batch of prompts)

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The chunks one engine output produces."""
        chunks = []
        for delta in output.choices:
            state = self.states[delta.index]
            if state.finished:
                continue
            logprobs = list(delta.logprobs or ())
            first = not state.started
            echo = echo_of(self.echo, delta.index)
            text = echo + delta.text if first else delta.text
            if text or logprobs or first:
                chunks.append(self._text(delta.index, text, logprobs, len(echo) if first else 0))
            if delta.finish_reason:
                chunks.extend(self._end(delta.index, delta.finish_reason))
        return chunks

    def _text(self, index: int, text: str, logprobs: list[TokenLogprob], echo_len: int) -> dict[str, Any]:
        state = self.states[index]
        lp = completion_logprobs(logprobs, state.offset + echo_len) if self.want_logprobs and logprobs else None
        state.started = True
        state.offset += len(text)
        return self._chunk([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])

    def _end(self, index: int, reason: str | None) -> list[dict[str, Any]]:
        state = self.states[index]
        chunks = [] if state.started else [self._text(index, echo_of(self.echo, index), [], 0)]
        state.finished = True
        chunks.append(self._chunk([{"index": index, "text": "", "logprobs": None,
                                    "finish_reason": finish_reason(reason)}]))
        return chunks
