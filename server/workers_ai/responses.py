"""Pure functions: engine outputs → Workers AI results, envelopes and stream events."""

from __future__ import annotations

import json
import logging
from typing import Any

from toolkit.runtime.types import RequestOutput
from toolkit.server.json_close import complete_json
from toolkit.server.tool_parse import ToolCall
from toolkit.server.tool_stream import HoldBack
from toolkit.server.tools import ToolPlan

log = logging.getLogger(__name__)


def envelope(result: dict[str, Any]) -> dict[str, Any]:
    """``{"result": ..., "success": true, "errors": [], "messages": []}``."""
    return {"result": result, "success": True, "errors": [], "messages": []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Workers AI tool calls: ``{"name", "arguments": {object}}``."""
    return [{"name": c.name, "arguments": c.arguments} for c in calls]


def run_result(text: str, tools: ToolPlan, json_mode: bool, usage_body: dict[str, int]) -> dict[str, Any]:
    """The ``result`` object: ``response`` (an object in JSON mode), ``usage``, ``tool_calls``."""
    calls = tools.parse(text)
    response: Any = "" if calls else text
    if json_mode:
        response = json_value(text)
    result: dict[str, Any] = {"response": response, "usage": usage_body}
    if calls:
        result["tool_calls"] = tool_calls_json(calls)
    return result


def json_value(text: str) -> Any:
    """The JSON value of a ``response_format`` reply: never a string standing for the object.

    The ONNX engine closes the value before max_tokens ends it (see ``runtime/json_constraint.py``);
    output that still does not parse (an engine without that steering, or a budget below the
    schema's shortest document) is completed with the shortest closing text, else ``{}``.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    closing = complete_json(text.strip())
    if closing is not None:
        try:
            return json.loads(text.strip() + closing)
        except ValueError:
            pass
    log.warning("JSON mode output did not parse or complete; answering an empty object")
    return {}


class RunStream:
    """``data: {"response": ...}`` events, then tool calls (if any) and the final usage event."""

    def __init__(self, tools: ToolPlan) -> None:
        self.holdback = HoldBack(tools)

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The events one engine output produces (empty text sends nothing)."""
        events = []
        for delta in output.choices:
            now = self.holdback.feed(delta.text)
            if now is not None and now[0]:
                events.append({"response": now[0]})
        return events

    def final(self, usage_body: dict[str, int]) -> list[dict[str, Any]]:
        """Held text or tool calls, then ``{"response": "", "usage": {...}}``."""
        calls, held, _ = self.holdback.finish()
        events: list[dict[str, Any]] = []
        if calls:
            events.append({"response": "", "tool_calls": tool_calls_json(calls)})
        elif held:
            events.append({"response": held})
        events.append({"response": "", "usage": usage_body})
        return events
