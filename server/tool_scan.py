"""Character-level recognition of a tool call's JSON while it is still being decoded.

The streamer (``server/tool_stream.py``) must know as early as possible whether a reply is a
call (the first key and the tool name) and send the arguments as they arrive, before the JSON is
complete, so ``json.loads`` on the whole reply cannot serve. :class:`CallScanner` walks
``{"name": ..., "arguments": {...}}`` (or a list of them) one character at a time, with the
arguments value checked by ``server/json_close.py``'s :class:`JsonPrefix`.
"""

from __future__ import annotations

import json

from toolkit.server.json_close import JsonPrefix

ARGUMENT_KEYS = ("arguments", "parameters")


class CallScanner:
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
        self._value: JsonPrefix | None = None
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
        # top | key_or_end | colon | value_start | after_value | between_calls | next_call
        getattr(self, f"_on_{state}")(ch)

    def _on_top(self, ch: str) -> None:
        if ch == "[" and not self.array:
            self.array = True
        elif ch == "{":
            self._open_call()
        else:
            self.state = "broken"

    def _on_key_or_end(self, ch: str) -> None:
        if ch == '"':
            self.state, self._string = "key", ""
        elif ch == "}" and self._first_key_done:
            self._close_call()
        else:
            self.state = "broken"

    def _on_colon(self, ch: str) -> None:
        self.state = "value_start" if ch == ":" else "broken"

    def _on_value_start(self, ch: str) -> None:
        if self._key == "name":
            if ch == '"':
                self.state, self._string = "name", ""
            else:
                self.state = "broken"
        elif self._key in ARGUMENT_KEYS or self._first_key_done:
            self._value, self._value_key, self.state = JsonPrefix(), self._key, "value"
            self._push_value(ch)
        else:
            self.state = "broken"

    def _on_after_value(self, ch: str) -> None:
        if ch == ",":
            self.state, self._first_key_done = "key_or_end", True
        elif ch == "}":
            self._close_call()
        else:
            self.state = "broken"

    def _on_between_calls(self, ch: str) -> None:
        if ch == "," and self.array:
            self.state = "next_call"
        elif ch == "]" and self.array:
            self.state = "end"
        else:
            self.state = "broken"

    def _on_next_call(self, ch: str) -> None:
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
            self._end_string()
        else:
            self._string += ch

    def _end_string(self) -> None:
        """A key or the tool name is complete."""
        try:
            text = json.loads('"' + self._string + '"')
        except ValueError:
            self.state = "broken"
            return
        if self.state == "key":
            if not self._first_key_done and text not in ("name", *ARGUMENT_KEYS):
                self.state = "broken"  # a JSON reply, not a call
                return
            self._key, self.state = text, "colon"
        else:
            self._name, self.name_ready = text, text
            self.calls_named += 1
            self._first_key_done = True
            self.state = "after_value"

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
        if self._value_key in ARGUMENT_KEYS and self._name is None:
            self._pending_args = self._value.text
        self._value_key = self._value_key if self._value_key in ARGUMENT_KEYS else ""

    def take_arguments(self) -> str:
        """Arguments text of the current call not yet taken (only once its name is known)."""
        if self._name is None:
            return ""
        if self._pending_args is not None:
            text, self._pending_args = self._pending_args, None
            self._args_sent = len(text)
            return text if text.startswith("{") else ""
        value = self._value
        if value is None or self._value_key not in ARGUMENT_KEYS or not value.text.startswith("{"):
            return ""
        safe = value.safe_length()
        text = value.text[self._args_sent:safe]
        self._args_sent = max(self._args_sent, safe)
        return text
