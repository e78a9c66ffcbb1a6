"""The shared error responder (server/responders.py) with each API's own table and envelope."""

from __future__ import annotations

import json

import pytest
from toolkit.runtime.errors import EngineStoppedError, OverloadedError
from toolkit.server.errors import KINDS, ApiError, ClientDisconnected
from toolkit.server.openai import errors as openai_errors
from toolkit.server.responders import ErrorSchema
from toolkit.server.workers_ai import errors as workers_ai_errors

SCHEMAS = {"openai": openai_errors.SCHEMA, "workers_ai": workers_ai_errors.SCHEMA}


def _body(response) -> dict:
    return json.loads(response.content)


def test_both_tables_map_every_kind():
    for schema in SCHEMAS.values():
        assert all(100 <= schema.status(kind) <= 599 for kind in KINDS)
    with pytest.raises(ValueError, match="unavailable"):
        ErrorSchema({kind: (400,) for kind in KINDS if kind != "unavailable"}, lambda error: {})


def test_overloaded_is_429_with_retry_after_in_both_envelopes():
    exc = OverloadedError(8, 8)
    exc.retry_after_s = 3
    message = "the server is overloaded (8 requests waiting, limit 8); retry later"
    openai = openai_errors.error_response(exc)
    assert openai.status_code == 429 and openai.headers["Retry-After"] == "3"
    assert _body(openai) == {"error": {"message": message, "type": "rate_limit_error",
                                       "param": None, "code": "rate_limit_exceeded"}}
    workers = workers_ai_errors.error_response(exc)
    assert workers.status_code == 429 and workers.headers["Retry-After"] == "3"
    assert _body(workers) == {"result": {}, "success": False, "messages": [],
                              "errors": [{"message": message, "code": 3040}]}


def test_unavailable_is_503_with_retry_after_and_plain_errors_have_none():
    for schema in SCHEMAS.values():
        stopped = schema.response(EngineStoppedError("the engine is stopping"))
        assert stopped.status_code == 503 and stopped.headers["Retry-After"] == "1"
        bad = schema.response(ApiError("invalid", "bad 'n'", "n"))
        assert bad.status_code == 400 and "Retry-After" not in bad.headers


def test_client_disconnected_is_an_empty_499_in_both():
    for schema in SCHEMAS.values():
        response = schema.response(ClientDisconnected())
        assert response.status_code == 499 and response.content == b""


def test_statuses_differ_per_table():
    error = ApiError("unknown_model", "not served here", "model")
    assert openai_errors.error_response(error).status_code == 404
    assert workers_ai_errors.error_response(error).status_code == 400
    assert _body(workers_ai_errors.error_response(error))["errors"][0] == {"message": "model: not served here",
                                                                          "code": 5007}
