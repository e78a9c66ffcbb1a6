"""OpenAPI documentation of request bodies that handlers decode themselves.

Handlers read the raw body (:func:`toolkit.server.body.decode_body`) instead of Litestar's
``data`` injection, so Litestar cannot infer the body schema; :func:`json_body_operation`
adds it to the route's operation from msgspec's JSON schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.spec import Operation


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def json_body_operation(struct_type: type) -> type[Operation]:
    """An OpenAPI ``Operation`` class documenting ``struct_type`` as the JSON request body.

    Handlers read the raw body themselves (see :func:`decode_body`), so Litestar cannot infer
    the body schema; this adds it from msgspec's JSON schema.
    """
    schema = msgspec.json.schema(struct_type)
    body_schema = _inline_refs(schema, schema.get("$defs", {}))

    @dataclass
    class JsonBodyOperation(Operation):
        def to_schema(self) -> dict[str, Any]:
            result = super().to_schema()
            result["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
            return result

    JsonBodyOperation.__name__ = f"{struct_type.__name__}Operation"
    return JsonBodyOperation
