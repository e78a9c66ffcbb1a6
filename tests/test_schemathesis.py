"""Schemathesis against the live app's own OpenAPI schema (``/schema/openapi.json``): zero server errors.

The app runs over FakeEngines with an API key. The fetched schema is used as served, except
that the ``model`` fields (request body and the Workers AI path) get the served names as an
``enum``, so positive examples reach the engines instead of stopping at "unknown model";
negative mode still sends other names. Positive and negative data, the examples, coverage and
fuzzing phases, a bounded number of examples per operation (``SCHEMATHESIS_MAX_EXAMPLES``,
default 50), and one check: ``not_a_server_error``.

Dependency: ``schemathesis>=4,<5`` (the ``test`` extra).
"""

from __future__ import annotations

import copy
import os

import httpx
import pytest
import schemathesis
from fake_engine import FakeEngine, Served
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "50"))
SEED = 20260522


def with_model_enums(raw: dict, names: list[str]) -> dict:
    """A copy of the schema whose ``model`` body fields and path parameters list the served names."""
    schema = copy.deepcopy(raw)
    for item in schema["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "model" and parameter.get("in") == "path":
                    parameter["schema"] = {"type": "string", "enum": names}
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "model" in body.get("properties", {}):
                body["properties"]["model"] = {"type": "string", "enum": names}
    return schema


def _schema_of_an_app_like_served() -> tuple[dict, list[str]]:
    """The OpenAPI document an app like :class:`Served`'s serves, and its model names (no server needed).

    ``@schema.parametrize()`` needs the schema when pytest collects; the lazy ``from_fixture``
    loader does not work with pytest 9. ``test_served_schema_is_the_tested_one`` checks that the
    live server serves exactly this document.
    """
    from toolkit.recipes import get_recipe
    from toolkit.server.app import create_app

    engines = {name: FakeEngine(get_recipe(name)) for name in ("gemma-7b-it", "default", "codegemma-7b-it")}
    app = create_app(engines, [Served.API_KEY])
    names = [name for entry in app.state.ctx.models.entries for name in entry.names]
    return app.openapi_schema.to_schema(), names


RAW_SCHEMA, MODEL_NAMES = _schema_of_an_app_like_served()
schema = schemathesis.openapi.from_dict(with_model_enums(RAW_SCHEMA, MODEL_NAMES))
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
schema.config.generation.update(max_examples=MAX_EXAMPLES)


def test_served_schema_is_the_tested_one(served):
    live = httpx.get(served.base_url + "/schema/openapi.json", timeout=10).json()
    assert live == RAW_SCHEMA
    assert len(schema.get_all_operations and list(schema.get_all_operations())) >= 9


@schema.parametrize()
@pytest.mark.usefixtures("no_server_errors")  # each operation, alone or not: no 5xx counted, engines idle after
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, served):
    """Every generated request (valid or not) gets a non-5xx answer."""
    case.call_and_validate(base_url=served.base_url, headers=served.headers, timeout=10,
                           checks=[not_a_server_error])


def test_metrics_count_every_answer_by_status(served, http_status_counts):
    """The per-test guard (``no_server_errors``) reads these counters: they must see each answer."""
    before = http_status_counts(served)
    ok = served.post("/v1/chat/completions", json={"model": "google/gemma-7b-it",
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert served.post("/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 400
    after = http_status_counts(served)
    grown = {s: after[s] - before.get(s, 0.0) for s in after if after[s] != before.get(s, 0.0)}
    assert grown.get("400") == 1 and grown.get("200", 0) >= 1, grown
