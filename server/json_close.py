"""JSON value prefixes: is a text still the start of a JSON value, and what closes it shortest.

Streamed tool-call arguments leave as they are decoded, so each fragment sent must stay a prefix
that appending can complete, and a reply that ends early or breaks off must still yield JSON.
:class:`JsonPrefix` checks a value character by character (and says how much of it is safe to
send: not half an escape, not a dangling comma); :func:`complete_json` gives the shortest closing
text (closing strings, finishing numbers and literals, closing containers). Used by the tool-call
streamer (``server/tool_stream.py``) and by Workers AI's ``response_format`` results.
"""

from __future__ import annotations

import re

_LITERALS = ("true", "false", "null")
_NUMBER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class JsonPrefix:
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
        if self.token and (ch.isalnum() or ch in ".+-"):
            return self._extend_token(ch)
        if self.token and not self._end_token():
            return False
        if ch.isspace():
            return not self.complete
        if ch != ",":
            self._comma_at = -1
        return self._structural(ch)

    def _extend_token(self, ch: str) -> bool:
        candidate = self.token + ch
        if not _token_prefix(candidate):
            return False
        self.token = candidate
        self.complete = not self.stack and _token_complete(candidate)
        return True

    def _end_token(self) -> bool:
        """The number or literal ends here; False when it is incomplete or nothing may follow."""
        if not _token_complete(self.token):
            return False
        self.token = ""
        self._after_value()
        return bool(self.stack)

    def _structural(self, ch: str) -> bool:
        """A quote, bracket, comma, colon or the start of a number or literal."""
        exp = self.expect
        if ch == '"':
            return self._open_string(exp)
        if ch in "{[":
            return self._open_container(ch, exp)
        if ch in "}]":
            return self._close_container(ch, exp)
        if ch in ",:":
            return self._separator(ch, exp)
        if exp in ("value", "value_or_close") and (ch.isdigit() or ch in "-tfn"):
            if not _token_prefix(ch):
                return False
            self.token = ch
            self.complete = not self.stack and _token_complete(ch)
            return True
        return False

    def _open_string(self, exp: str) -> bool:
        if exp in ("value", "value_or_close"):
            self.in_string, self.is_key = True, False
            return True
        if exp in ("key", "key_or_close"):
            self.in_string, self.is_key = True, True
            return True
        return False

    def _open_container(self, ch: str, exp: str) -> bool:
        if exp not in ("value", "value_or_close"):
            return False
        self.stack.append(ch)
        self.expect = "key_or_close" if ch == "{" else "value_or_close"
        return True

    def _close_container(self, ch: str, exp: str) -> bool:
        want = "{" if ch == "}" else "["
        if not self.stack or self.stack[-1] != want:
            return False
        if exp not in ("key_or_close", "value_or_close", "comma_or_close"):
            return False
        self.stack.pop()
        self._after_value(closed=True)
        return True

    def _separator(self, ch: str, exp: str) -> bool:
        if ch == ",":
            if exp != "comma_or_close":
                return False
            self.expect = "key" if self.stack[-1] == "{" else "value"
            self._comma_at = len(self.text)
            return True
        if exp != "colon":
            return False
        self.expect = "value"
        return True

    def _string_char(self, ch: str) -> bool:
        if self.escape:
            return self._escape_char(ch)
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

    def _escape_char(self, ch: str) -> bool:
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
        return any(word.startswith(token) for word in _LITERALS)
    return _NUMBER_PREFIX.fullmatch(token) is not None and (
        token[0] != "-" or len(token) == 1 or token[1].isdigit())


def _token_complete(token: str) -> bool:
    if token in _LITERALS:
        return True
    return _NUMBER.fullmatch(token) is not None


def _finish_token(token: str) -> str:
    for word in _LITERALS:
        if word.startswith(token):
            return word[len(token):]
    return "" if _token_complete(token) else "0"


def complete_json(prefix: str) -> str | None:
    """The shortest text that makes the JSON value prefix ``prefix`` complete ("" if it is),
    or None when ``prefix`` is not a JSON value prefix that appending can repair (e.g. it ends
    in a dangling comma or half an escape: hold those back, see ``JsonPrefix.safe_length``)."""
    value = JsonPrefix()
    for ch in prefix.lstrip():
        if not value.push(ch):
            return None
    if value.complete:
        return _finish_token(value.token) if value.token else ""
    if value.safe_length() != len(value.text):
        return None
    return value.closing() if value.text else None
