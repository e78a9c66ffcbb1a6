"""Server-sent events as bytes: one ``data: {...}`` event, the ``[DONE]`` terminator, the headers.

Both APIs stream the same SSE framing; only the payloads differ (built in each API's package).
"""

from __future__ import annotations

import json
from typing import Any

DONE_EVENT = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: Any) -> bytes:
    """One ``data: {...}\\n\\n`` event, with the reference's spacing (``", "`` and ``": "``)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"
