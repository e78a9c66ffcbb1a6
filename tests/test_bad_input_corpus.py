"""A corpus of malformed and hostile requests against a live server over FakeEngines, both schemas.

Every corpus entry is its own test: it is sent raw (httpx with a byte body, or a raw socket for
the HTTP-level tricks httpx would normalise) and must get a 4xx (never a 5xx) in the envelope of
its route (OpenAI ``{"error": {message, type, param, code}}``; Workers AI ``{"result": {},
"success": false, "errors": [{message, code}], "messages": []}``), naming the offending field
where there is one, with no stack trace or server file path in the body; right after it, the
server must answer a normal request of the same API. Requests the HTTP parser itself refuses
(the ``stack`` entries) are answered by uvicorn with a plain 400 before the app sees them.

A second, smaller table holds requests *at* each limit, which must succeed.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fake_engine import Served

MODEL = "google/gemma-7b-it"
SMALL = "google/codegemma-7b-it"  # a fake with a 64-token context window
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DI_CHAT = "/v1/openai/chat/completions"
DI_COMPLETIONS = "/v1/openai/completions"
RUN = "/client/v4/accounts/acct/ai/run/@hf/google/gemma-7b-it"
RUN_PREFIX = "/client/v4/accounts/acct/ai/run/"
DROP = object()
#: Every test, run alone or with the others, also checks that no 5xx was answered while it ran and
#: that the engines ended idle with their cache freed (conftest.py ``no_server_errors``).
pytestmark = pytest.mark.usefixtures("no_server_errors")
LEAKS = re.compile(r'Traceback|File "|\.py\b|site-packages|/work/|/usr/lib|\bline \d+, in\b')


@dataclass(frozen=True)
class Entry:
    """One request of the corpus and what its answer must be."""

    id: str
    path: str
    body: bytes | None = None
    status: tuple[int, ...] = ()  # allowed statuses; empty: any 4xx
    param: str | None = None  # the field the error must name
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    auth: bool = True
    method: str = "POST"
    raw: bytes | None = None  # the whole HTTP request, sent over a socket
    stack: bool = False  # may be refused by the HTTP parser (plain-text 400, no envelope)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return "workers_ai" if self.path.startswith("/client/v4/") else "openai"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def chat(**fields: Any) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return {k: v for k, v in body.items() if v is not DROP}


def completion(**fields: Any) -> dict:
    body = {"model": MODEL, "prompt": "hi", **fields}
    return {k: v for k, v in body.items() if v is not DROP}


def run(**fields: Any) -> dict:
    body = {"prompt": "hi", **fields}
    return {k: v for k, v in body.items() if v is not DROP}


def label(value: Any) -> str:
    """A short, readable test-id fragment for ``value``."""
    if value == "":
        return "empty-string"
    text = json.dumps(value).translate(str.maketrans("[]{}", "()<>"))
    text = re.sub(r"[^A-Za-z0-9.+()<>-]+", "_", text).strip("_")
    return text if len(text) <= 32 else f"{text[:24]}..{len(text)}"


def oa(field_name: str, value: Any, param: str | None = "=", *, path: str = CHAT, status: tuple[int, ...] = (400,),
       name: str | None = None, base=chat) -> Entry:
    """An OpenAI request with one field set to ``value``; the error must name ``param`` (default: the field)."""
    param = field_name if param == "=" else param
    return Entry(f"openai-{name or field_name}-{label(value)}" + ("" if path == CHAT else f"@{path}"), path,
                 dumps(base(**{field_name: value})), status, param)


def oc(field_name: str, value: Any, param: str | None = "=", **kw: Any) -> Entry:
    """The same on /v1/completions."""
    return oa(field_name, value, param, path=COMPLETIONS, base=completion, **kw)


def wa(field_name: str, value: Any, param: str | None = "=", *, status: tuple[int, ...] = (400,),
       code: int | None = 5006, name: str | None = None, base=run) -> Entry:
    """A Workers AI request with one field set to ``value``; the error message must name ``param``."""
    param = field_name if param == "=" else param
    return Entry(f"workers-{name or field_name}-{label(value)}", RUN, dumps(base(**{field_name: value})), status,
                 param, extra={"code": code})


def http(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return method.encode() + b" " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" \
        + lines + b"\r\n" + body


AUTH = (b"Authorization", b"Bearer " + Served.API_KEY.encode())
JSON_CT = (b"Content-Type", b"application/json")
GOOD = dumps(chat())


def cl(body: bytes) -> tuple[bytes, bytes]:
    return (b"Content-Length", str(len(body)).encode())


def build_corpus() -> list[Entry]:
    c: list[Entry] = []
    # --- bodies that are not a JSON object ---------------------------------------------------------
    for path in (CHAT, COMPLETIONS, DI_CHAT, DI_COMPLETIONS, RUN):
        api = "workers" if path == RUN else "openai"
        where = "" if path in (CHAT, RUN) else f"@{path}"
        for name, body in [("empty", b""), ("whitespace", b" \n\t "), ("null", b"null"), ("true", b"true"),
                           ("number", b"123"), ("string", b'"text"'), ("array", b"[]"), ("array-of-object", b"[{}]"),
                           ("truncated", b'{"model": "x", "messa'), ("trailing-garbage", GOOD + b"}}"),
                           ("single-quotes", b"{'model': 'x'}")]:
            if path not in (CHAT, RUN) and name not in ("empty", "array", "truncated"):
                continue
            c.append(Entry(f"{api}-body-{name}{where}", path, body, (400,)))
    for path in (CHAT, RUN):
        api = "workers" if path == RUN else "openai"
        c += [
            Entry(f"{api}-nan-literal", path, b'{"model": "%s", "prompt": "hi", "messages": [{"role": "user", '
                  b'"content": "hi"}], "temperature": NaN}' % MODEL.encode(), (400,)),
            Entry(f"{api}-infinity-literal", path, b'{"prompt": "hi", "temperature": Infinity}', (400,)),
            Entry(f"{api}--infinity-literal", path, b'{"prompt": "hi", "top_p": -Infinity}', (400,)),
            Entry(f"{api}-1e999-overflows-to-inf", path, b'{"prompt": "hi", "temperature": 1e999}', (400,)),
            Entry(f"{api}-nested-100k-arrays", path, b"[" * 100_000 + b"]" * 100_000, (400,)),
            Entry(f"{api}-nested-100k-objects", path, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, (400,)),
            Entry(f"{api}-nested-65-in-a-field", path,
                  dumps(chat() if path == CHAT else run()).rstrip(b"}") + b', "user_data": ' + b"[" * 65 + b"]" * 65
                  + b"}", (400,)),
            Entry(f"{api}-invalid-utf8-in-string", path,
                  (dumps(chat(messages=[{"role": "user", "content": "@@"}])) if path == CHAT
                   else dumps(run(prompt="@@"))).replace(b"@@", b"\xff\xfe\xc3"), (400,)),
            Entry(f"{api}-lone-surrogate-escape", path,
                  dumps(chat() if path == CHAT else run()).replace(b'"hi"', b'"\\ud800"'), (400,)),
            Entry(f"{api}-utf16-body", path, json.dumps(chat() if path == CHAT else run()).encode("utf-16"), (400,),
                  headers=(("content-type", "application/json; charset=utf-16"),)),
            Entry(f"{api}-gzip-body", path, b"\x1f\x8b\x08\x00" + b"\x00" * 16, (400,),
                  headers=(("content-type", "application/json"), ("content-encoding", "gzip"))),
            Entry(f"{api}-10MB-body", path, b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}', (413,)),
            Entry(f"{api}-10MB-chunked-body", path, None, (413,), extra={"chunked": 10 * 1024 * 1024}),
        ]
        for ct, body in [("text/plain", GOOD if path == CHAT else dumps(run())),
                         ("application/x-www-form-urlencoded", b"model=x&prompt=hi"),
                         ("multipart/form-data; boundary=b",
                          b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--b--\r\n'),
                         ("application/xml", b"<prompt>hi</prompt>"), ("text/html", b"<html></html>")]:
            c.append(Entry(f"{api}-content-type-{ct.split(';')[0].replace('/', '_')}", path, body, (400,),
                           headers=(("content-type", ct),)))

    # --- OpenAI chat: wrong types, out of range, limits ---------------------------------------------
    for value in (5, None, [], {}, True):
        c.append(oa("model", value))
    for value in ("hi", {}, [1], [None], None, [[]]):
        c.append(oa("messages", value, "messages" if not isinstance(value, list) or not value else "messages[0]"))
    c += [
        oa("messages", [], name="messages-empty"),
        oa("messages", [{"role": 5, "content": "x"}], "messages[0].role", name="role-int"),
        oa("messages", [{"role": "robot", "content": "x"}], "messages[0].role", name="role-unknown"),
        oa("messages", [{"role": None, "content": "x"}], "messages[0].role", name="role-null"),
        oa("messages", [{"content": "x"}], "messages[0].role", name="role-missing"),
        oa("messages", [{"role": "user"}], "messages[0].content", name="content-missing"),
        oa("messages", [{"role": "user", "content": 5}], "messages[0].content", name="content-int"),
        oa("messages", [{"role": "user", "content": {"a": 1}}], "messages[0].content", name="content-object"),
        oa("messages", [{"role": "user", "content": [5]}], "messages[0].content[0]", name="content-part-int"),
        oa("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
           "messages[0].content", name="content-part-image"),
        oa("messages", [{"role": "user", "content": True}], "messages[0].content", name="content-bool"),
        oa("messages", [{"role": "user", "content": "x", "name": 5}], "messages[0].name", name="name-int"),
        oa("messages", [{"role": "assistant", "content": None, "tool_calls": "x"}], "messages[0].tool_calls",
           name="tool-calls-string"),
        oa("messages", [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f",
                                                                                         "arguments": "{oops"}}]}],
           "messages[0].tool_calls", name="tool-call-arguments-not-json"),
        oa("messages", [{"role": "tool", "content": "x", "tool_call_id": 5}], "messages[0].tool_call_id",
           name="tool-call-id-int"),
    ]
    for name_, value, param in [
        ("temperature", "hot", None), ("temperature", True, None), ("temperature", -0.1, None),
        ("temperature", 2.0001, None), ("temperature", 1e308, None), ("temperature", [], None),
        ("top_p", 0, None), ("top_p", -1, None), ("top_p", 1.0001, None), ("top_p", "1", None),
        ("min_p", -0.01, None), ("min_p", 1.01, None), ("top_k", -1, None), ("top_k", 1000, None),
        ("top_k", 1.5, None), ("top_k", 2**70, None), ("max_tokens", -1, None), ("max_tokens", 1.5, None),
        ("max_tokens", "10", None), ("max_tokens", 2**70, None), ("max_tokens", 1_000_001, None),
        ("max_completion_tokens", -5, None), ("n", 0, None), ("n", 5, None), ("n", "2", None), ("n", 2**70, None),
        ("n", True, None), ("stop", ["s"] * 17, None), ("stop", 5, None), ("stop", [5], "stop[0]"),
        ("stop", [""], None), ("stop", {"a": 1}, None), ("presence_penalty", 2.01, None),
        ("presence_penalty", -2.01, None), ("frequency_penalty", 2.01, None), ("frequency_penalty", -2.01, None),
        ("frequency_penalty", "x", None), ("repetition_penalty", 0, None), ("repetition_penalty", 0.009, None),
        ("repetition_penalty", 5.01, None), ("repetition_penalty", -1, None), ("seed", -1, None),
        ("seed", 2**63, None), ("seed", 2**70, None), ("seed", 1.5, None), ("seed", "42", None),
        ("user", 5, None), ("stream", "yes", None), ("stream", 1, None), ("stream_options", "x", None),
        ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
        ("logprobs", "yes", None), ("logprobs", 1, None), ("top_logprobs", 21, None), ("top_logprobs", -1, None),
        ("top_logprobs", "x", None), ("response_format", "json", None),
        ("response_format", {"type": "xml"}, "response_format.type"),
        ("response_format", {"type": "json_schema"}, "response_format.json_schema"),
        ("tools", "x", None), ("tools", [5], "tools[0]"), ("tools", [{"type": "function"}], "tools[0].function"),
        ("tools", [{"type": "function", "function": {"name": ""}}], "tools[0].function.name"),
        ("tools", [{"type": "function", "function": {"name": "f" * 65}}], "tools[0].function.name"),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": 5}}], "tools[0].function.parameters"),
        ("tool_choice", 5, None), ("tool_choice", "sometimes", None),
        ("tool_choice", {"type": "function"}, "tool_choice.function"),
        ("tool_choice", {"type": "function", "function": {"name": "ghost"}}, "tool_choice"),
    ]:
        c.append(oa(name_, value, param or name_))
    c.append(Entry("openai-top_logprobs-20-without-logprobs", CHAT, dumps(chat(top_logprobs=20)), (400,),
                   "top_logprobs"))
    c.append(Entry("openai-max_tokens-past-the-context-window", CHAT, dumps(chat(model=SMALL, max_tokens=64)),
                   (400,), "messages", extra={"mentions": "max_tokens"}))
    c.append(Entry("openai-prompt-longer-than-the-context", CHAT,
                   dumps(chat(model=SMALL, messages=[{"role": "user", "content": "word " * 200}])), (400,), "messages"))
    c.append(Entry("openai-missing-model", CHAT, dumps(chat(model=DROP)), (400,), "model"))
    c.append(Entry("openai-missing-messages", CHAT, dumps(chat(messages=DROP)), (400,), "messages"))
    c.append(Entry("openai-prompt-instead-of-messages", CHAT, dumps(completion()), (400,), "messages"))

    # --- OpenAI completions ---------------------------------------------------------------------------
    for value, param in [(5, "prompt"), (None, "prompt"), ([], "prompt"), ([-1], "prompt"), ([1.5], "prompt"),
                         ([[1], ["a"]], "prompt"), (["a", ""], "prompt"), ("", "prompt"), ({"text": "x"}, "prompt")]:
        c.append(oc("prompt", value, param))
    for name_, value in [("echo", "yes"), ("logprobs", 6), ("logprobs", -1), ("logprobs", True), ("max_tokens", -1),
                         ("temperature", 2.5), ("n", 5), ("n", 0), ("stop", ["s"] * 17)]:
        c.append(oc(name_, value))
    c.append(oa("temperature", 3, path=DI_CHAT))
    c.append(oa("n", 9, path=DI_COMPLETIONS, base=completion))

    # --- unknown models, path tricks (OpenAI: in the body) --------------------------------------------
    for value in ("../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "C:\\Windows\\win.ini",
                  "gemma\u0000.onnx", "", "x" * 100_000, "google/gemma-7b-it/../../../etc/passwd", "file:///etc/passwd",
                  "~/.ssh/id_rsa", "%00", "models/../../model.onnx", "google/gemma-7b-it\n"):
        c.append(Entry(f"openai-unknown-model-{label(value)}", CHAT, dumps(chat(model=value)), (404,), "model"))

    # --- Workers AI: wrong types, out of range, limits -------------------------------------------------
    c += [
        wa("prompt", 5), wa("prompt", ""), wa("prompt", ["hi"]), wa("prompt", {"text": "hi"}),
        Entry("workers-neither-prompt-nor-messages", RUN, b"{}", (400,), "prompt", extra={"code": 5006}),
        Entry("workers-prompt-and-messages", RUN, dumps(run(messages=[{"role": "user", "content": "x"}])), (400,),
              "prompt", extra={"code": 5006}),
        wa("messages", "hi", base=lambda **f: {k: v for k, v in f.items()}),
        wa("messages", [], base=lambda **f: dict(f), name="messages-empty"),
        wa("messages", [5], "messages[0]", base=lambda **f: dict(f)),
        wa("messages", [{"role": "user"}], "messages[0].content", base=lambda **f: dict(f), name="content-missing"),
        wa("messages", [{"role": "user", "content": 5}], "messages[0].content", base=lambda **f: dict(f),
           name="content-int"),
        wa("messages", [{"role": "robot", "content": "x"}], "messages[0].role", base=lambda **f: dict(f),
           name="role-unknown"),
        wa("messages", [{"role": 5, "content": "x"}], "messages[0].role", base=lambda **f: dict(f), name="role-int"),
        wa("raw", "yes"), wa("lora", 5), wa("lora", "my-adapter", status=(405,), code=5005),
        wa("functions", "x"), wa("functions", [{"name": "f"}], "functions[0].code"),
        wa("tools", "x", base=lambda **f: {"messages": [{"role": "user", "content": "x"}], **f}),
        wa("tools", [5], "tools[0]", base=lambda **f: {"messages": [{"role": "user", "content": "x"}], **f}),
        wa("tools", [{"name": "", "description": "d", "parameters": {"type": "object", "properties": {}}}],
           "tools[0].name", base=lambda **f: {"messages": [{"role": "user", "content": "x"}], **f}),
        wa("tools", [{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}],
           "tools", name="tools-with-prompt"),
        wa("response_format", {"type": "xml"}, "response_format.type"),
        wa("response_format", {"type": "json_schema", "json_schema": 5}, "response_format.json_schema"),
        Entry("workers-json-mode-with-stream", RUN, dumps(run(stream=True, response_format={"type": "json_object"})),
              (400,), "response_format", extra={"code": 5006}),
        wa("stream", "yes"), wa("max_tokens", -1), wa("max_tokens", "x"), wa("max_tokens", 1.5),
        wa("max_tokens", 2**70, status=(413,), code=3006, param="max_tokens"),
        Entry("workers-max_tokens-past-the-context-window", RUN_PREFIX + "@hf/google/codegemma-7b-it",
              dumps(run(max_tokens=64)), (413,), "max_tokens", extra={"code": 3006}),
        wa("temperature", 5.01), wa("temperature", -1), wa("temperature", "x"), wa("temperature", 1e308),
        wa("top_p", 0), wa("top_p", 0.0009), wa("top_p", 1.01), wa("top_k", 0), wa("top_k", 51), wa("top_k", -1),
        wa("top_k", 2**70), wa("seed", 0), wa("seed", -1), wa("seed", 10_000_000_000), wa("seed", 2**70),
        wa("seed", "7"), wa("repetition_penalty", 2.01), wa("repetition_penalty", -0.1),
        wa("frequency_penalty", 2.01), wa("frequency_penalty", -2.01), wa("presence_penalty", 2.01),
        wa("presence_penalty", -2.01), wa("presence_penalty", "x"),
    ]
    # --- unknown models, path tricks (Workers AI: in the URL) ----------------------------------------
    for raw_model in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd", "%00", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                      "@hf%2F..%2F..%2F..%2Fmodel.onnx", "@hf/google/gemma-7b-it%00", "C:%5CWindows%5Cwin.ini",
                      "%ff%fe", "gemma-7b-it%0Aevil", "x" * 4000):
        c.append(Entry(f"workers-unknown-model-{label(raw_model)}", RUN_PREFIX + raw_model, dumps(run()), (400,),
                       None, extra={"code": 5007}))
    c.append(Entry("workers-dotdot-path-raw", RUN_PREFIX + "../../../../etc/passwd", None, (400,), None,
                   raw=http("POST", RUN_PREFIX + "../../../../etc/passwd", [AUTH, JSON_CT, cl(dumps(run()))],
                            dumps(run())), extra={"code": 5007}))
    c.append(Entry("workers-no-model", RUN_PREFIX, dumps(run()), (400, 404, 405)))

    # --- auth and header abuse -----------------------------------------------------------------------
    for path, api in ((CHAT, "openai"), (RUN, "workers")):
        body = GOOD if path == CHAT else dumps(run())
        for name, value in [("missing", None), ("wrong-key", "Bearer nope"), ("basic-scheme", "Basic dGVzdC1rZXk6"),
                            ("token-scheme", f"Token {Served.API_KEY}"), ("bearer-no-token", "Bearer"),
                            ("bearer-tab", "Bearer \t-"), ("key-prefix", f"Bearer {Served.API_KEY[:-1]}"),
                            ("key-suffix", f"Bearer {Served.API_KEY}x"), ("key-no-scheme", Served.API_KEY),
                            ("huge-64KB", "Bearer " + "a" * 65536)]:
            headers = (("content-type", "application/json"),) + ((("authorization", value),) if value else ())
            c.append(Entry(f"{api}-auth-{name}", path, body, (401,), headers=headers, auth=False))
        c.append(Entry(f"{api}-auth-in-x-api-key-header", path, body, (401,), auth=False,
                       headers=(("content-type", "application/json"), ("x-api-key", Served.API_KEY))))
        c.append(Entry(f"{api}-auth-in-query-string", path + f"?api_key={Served.API_KEY}", body, (401,), auth=False))
        for name, first, second in [("two-wrong", b"Bearer a", b"Bearer b"), ("right-then-wrong", AUTH[1], b"Bearer b"),
                                    ("wrong-then-right", b"Bearer b", AUTH[1])]:
            c.append(Entry(f"{api}-auth-duplicate-header-{name}", path, None, (401,),
                           raw=http("POST", path, [(b"Authorization", first), (b"Authorization", second), JSON_CT,
                                                   cl(body)], body)))
        c.append(Entry(f"{api}-auth-bearer-only-spaces", path, None, (401,),
                       raw=http("POST", path, [(b"Authorization", b"Bearer    "), JSON_CT, cl(body)], body)))
        c.append(Entry(f"{api}-auth-latin1-bytes", path, None, (401,),
                       raw=http("POST", path, [(b"Authorization", b"Bearer t\xe9st-key"), JSON_CT, cl(body)], body)))
        c.append(Entry(f"{api}-header-1MB", path, None, (400, 413, 431), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, (b"X-Big", b"a" * (1 << 20)), cl(body)], body)))
        c.append(Entry(f"{api}-header-NUL-byte", path, None, (400,), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, (b"X-A", b"a\x00b"), cl(body)], body)))
        c.append(Entry(f"{api}-content-length-conflicting-duplicates", path, None, (400,), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, cl(body), (b"Content-Length", b"3")], body)))
        c.append(Entry(f"{api}-content-length-negative", path, None, (400,), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, (b"Content-Length", b"-1")], body)))
        c.append(Entry(f"{api}-content-length-1TB", path, None, (413,),
                       raw=http("POST", path, [AUTH, JSON_CT, (b"Content-Length", str(10**12).encode())], b"{}")))
        c.append(Entry(f"{api}-content-length-shorter-than-body", path, None, (400,),
                       raw=http("POST", path, [AUTH, JSON_CT, (b"Content-Length", b"10")], body)))
        c.append(Entry(f"{api}-chunked-invalid-size", path, None, (400,), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, (b"Transfer-Encoding", b"chunked")],
                                b"zz\r\nabc\r\n0\r\n\r\n")))
        c.append(Entry(f"{api}-transfer-encoding-gzip", path, None, (400, 501), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, (b"Transfer-Encoding", b"gzip")], body)))
        c.append(Entry(f"{api}-header-without-colon", path, None, (400,), stack=True,
                       raw=http("POST", path, [AUTH, JSON_CT, cl(body)], body).replace(
                           b"Connection: close\r\n", b"Connection: close\r\nNoColonHere\r\n", 1)))
        c.append(Entry(f"{api}-method-GET", path, None, (405,), method="GET"))
        c.append(Entry(f"{api}-method-PUT", path, body, (405,), method="PUT"))
        c.append(Entry(f"{api}-method-DELETE", path, None, (405,), method="DELETE"))
        c.append(Entry(f"{api}-method-unknown", path, None, (405,),
                       raw=http("BREW", path, [AUTH, JSON_CT, cl(body)], body)))
    c += [
        Entry("openai-no-such-route", "/v1/chat/completion", GOOD, (404,)),
        Entry("openai-no-such-route-dotdot", "/v1/../v1/chat/completions", None, (404,),
              raw=http("POST", "/v1/../../etc/passwd", [AUTH, JSON_CT, cl(GOOD)], GOOD)),
        Entry("openai-models-without-key", "/v1/models", None, (401,), method="GET", auth=False),
        Entry("openai-metrics-without-key", "/metrics", None, (401,), method="GET", auth=False),
        Entry("openai-metrics-wrong-key", "/metrics", None, (401,), method="GET", auth=False,
              headers=(("authorization", "Bearer nope"),)),
        Entry("workers-no-such-route", "/client/v4/accounts/acct/ai/nothing", dumps(run()), (404,)),
        Entry("workers-raw-ff-byte-in-path", RUN_PREFIX + "xx", None, (400,), stack=True,
              raw=http("POST", RUN_PREFIX, [AUTH, JSON_CT, cl(dumps(run()))], dumps(run())).replace(
                  RUN_PREFIX.encode() + b" ", RUN_PREFIX.encode() + b"\xff\xfe ", 1)),
        Entry("stack-garbage-request-line", "/", None, (400,), stack=True, raw=b"\x00\x01\x02 garbage\r\n\r\n"),
        Entry("stack-no-host-header", "/health", None, (400,), stack=True,
              raw=b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        Entry("stack-space-in-path", "/health", None, (400,), stack=True,
              raw=b"GET /he alth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        Entry("stack-control-char-in-path", "/health", None, (400,), stack=True,
              raw=b"GET /health\x01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    ids = [e.id for e in c]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, duplicates
    return c


CORPUS = build_corpus()

#: Requests exactly at a limit (or legal but unusual): each must succeed.
AT_LIMITS: list[tuple[str, str, bytes]] = [
    *[(f"openai-{k}-{label(v)}", CHAT, dumps(chat(**{k: v}))) for k, v in [
        ("temperature", 0), ("temperature", 2), ("top_p", 1), ("top_k", 0), ("top_k", 999), ("min_p", 1),
        ("n", 4), ("stop", [f"s{i}" for i in range(16)]), ("max_tokens", 0), ("max_tokens", 1),
        ("presence_penalty", -2), ("presence_penalty", 2), ("frequency_penalty", -2), ("frequency_penalty", 2),
        ("repetition_penalty", 0.01), ("repetition_penalty", 5), ("seed", 0), ("seed", 2**63 - 1),
        ("max_completion_tokens", 1)]],
    ("openai-logprobs-top_logprobs-20", CHAT, dumps(chat(logprobs=True, top_logprobs=20))),
    ("openai-completions-logprobs-5", COMPLETIONS, dumps(completion(logprobs=5))),
    ("openai-max_tokens-fills-the-context", CHAT, dumps(chat(model=SMALL, max_tokens=50))),
    ("openai-unknown-field-tolerated", CHAT, dumps(chat(some_future_field={"a": [1]}))),
    ("openai-nested-60-in-unknown-field", CHAT, dumps(chat()).rstrip(b"}") + b', "x": ' + b"[" * 60 + b"]" * 60 + b"}"),
    ("openai-content-type-vnd+json", CHAT, dumps(chat())),
    ("openai-no-content-type", CHAT, dumps(chat())),
    *[(f"workers-{k}-{label(v)}", RUN, dumps(run(**{k: v}))) for k, v in [
        ("temperature", 0), ("temperature", 5), ("top_p", 0.001), ("top_p", 1), ("top_k", 1), ("top_k", 50),
        ("seed", 1), ("seed", 9_999_999_999), ("repetition_penalty", 0), ("repetition_penalty", 2),
        ("frequency_penalty", -2), ("presence_penalty", 2), ("max_tokens", 0)]],
    ("workers-percent-encoded-model", RUN_PREFIX + "@hf%2Fgoogle%2Fgemma-7b-it", dumps(run())),
    ("workers-bearer-scheme-lowercase", RUN, dumps(run())),
]


def send_raw(port: int, data: bytes, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request (with ``Connection: close``); the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def send(served: Served, entry: Entry) -> tuple[int, dict[str, str], bytes]:
    if entry.raw is not None:
        return send_raw(served.live.port, entry.raw)
    headers = dict(entry.headers)
    if entry.auth:
        headers.update(served.headers)
    content: Any = entry.body
    if "chunked" in entry.extra:
        size = entry.extra["chunked"]
        content = (b'{"prompt": "' + b"x" * (1 << 20) if i == 0 else b"x" * (1 << 20) for i in range(size >> 20))
    with httpx.Client(timeout=30) as client:
        try:
            r = client.request(entry.method, served.base_url + entry.path, content=content, headers=headers)
        except httpx.WriteError:
            pytest.fail("the server closed the connection without answering")
    return r.status_code, dict(r.headers), r.content


def check_envelope(entry: Entry, status: int, headers: dict[str, str], body: bytes) -> None:
    text = body.decode("utf-8", errors="replace")
    assert not LEAKS.search(text), f"stack trace or server path in the answer: {text[:500]}"
    if entry.stack and not headers.get("content-type", "").startswith("application/json"):
        assert status == 400, status  # refused by the HTTP parser before the app
        return
    assert headers.get("content-type", "").startswith("application/json"), headers
    data = json.loads(body)
    if entry.api == "openai":
        assert list(data) == ["error"], data
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        if entry.param is not None:
            assert error["param"] == entry.param, error
        if "mentions" in entry.extra:
            assert entry.extra["mentions"] in error["message"], error
    else:
        assert set(data) == {"result", "success", "errors", "messages"}, data
        assert data["result"] == {} and data["success"] is False and data["messages"] == [], data
        assert len(data["errors"]) >= 1 and all(set(e) == {"message", "code"} for e in data["errors"]), data
        error = data["errors"][0]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["code"], int)
        if entry.extra.get("code") is not None:
            assert error["code"] == entry.extra["code"], error
        if entry.param is not None:
            assert entry.param in error["message"], error


def assert_still_serving(served: Served, api: str) -> None:
    if api == "openai":
        r = served.post(CHAT, json=chat(messages=[{"role": "user", "content": "still there?"}]))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    else:
        r = served.post(RUN, json=run(prompt="still there?"))
        assert r.status_code == 200 and r.json()["success"] is True, r.text


def test_corpus_size():
    assert len(CORPUS) >= 100
    assert {e.api for e in CORPUS} == {"openai", "workers_ai"}
    assert sum(e.api == "openai" for e in CORPUS) >= 50 and sum(e.api == "workers_ai" for e in CORPUS) >= 50


@pytest.mark.parametrize("entry", CORPUS, ids=[e.id for e in CORPUS])
def test_bad_request_gets_a_clean_4xx(served, entry):
    status, headers, body = send(served, entry)
    assert 400 <= status < 500, (status, body[:500])
    if entry.status:
        assert status in entry.status, (status, body[:500])
    check_envelope(entry, status, headers, body)
    assert_still_serving(served, entry.api)


@pytest.mark.parametrize("path,body", [(p, b) for _, p, b in AT_LIMITS], ids=[i for i, _, _ in AT_LIMITS])
def test_request_at_a_limit_succeeds(served, request, path, body):
    headers = {"content-type": "application/json"}
    case = request.node.callspec.id
    if case == "openai-content-type-vnd+json":
        headers["content-type"] = "application/vnd.api+json; charset=utf-8"
    elif case == "openai-no-content-type":
        headers = {}
    if case == "workers-bearer-scheme-lowercase":
        headers["authorization"] = f"bearer {Served.API_KEY}"  # auth schemes are case-insensitive
    else:
        headers.update(served.headers)
    r = httpx.post(served.base_url + path, content=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text


def test_identical_duplicate_content_length_is_one_header(served):
    """RFC 9110 §8.6: identical repeated Content-Length values may be folded; h11 does, and the request works."""
    status, _, body = send_raw(served.live.port, http("POST", CHAT, [AUTH, JSON_CT, cl(GOOD), cl(GOOD)], GOOD))
    assert status == 200, body


# --- security ---------------------------------------------------------------------------------------


def concrete(path: str) -> str:
    return path.replace("{account_id:str}", "acct").replace("{model:path}", "@hf/google/gemma-7b-it")


def test_every_route_but_health_and_the_docs_needs_the_key(served):
    """With keys configured, every route of the app answers 401 without one, except /health and the
    OpenAPI documentation under /schema (no data); /metrics needs the key too."""
    open_routes = []
    for route in served.app.routes:
        for method in sorted(getattr(route, "methods", ()) - {"HEAD", "OPTIONS"}):
            path = concrete(route.path)
            body = dumps(run()) if path.startswith("/client/") else GOOD
            r = httpx.request(method, served.base_url + path, content=body if method == "POST" else None,
                              headers={"content-type": "application/json"}, timeout=10)
            if r.status_code != 401:
                open_routes.append(path)
    assert open_routes and all(p == "/health" or p.startswith("/schema") for p in open_routes), open_routes
    assert "/health" in open_routes and "/metrics" not in open_routes


def test_metrics_can_be_made_public_and_the_api_stays_closed():
    from fake_engine import FakeEngine, LiveServer
    from toolkit.recipes import get_recipe
    from toolkit.server.app import create_app

    app = create_app({"default": FakeEngine(get_recipe("default"))}, ["k"], public_metrics=True)
    with LiveServer(app) as live:
        assert httpx.get(live.base_url + "/metrics").status_code == 200
        assert httpx.get(live.base_url + "/v1/models").status_code == 401
        assert httpx.post(live.base_url + CHAT, json=chat(model="gemma-3-270m")).status_code == 401


def test_api_keys_never_reach_the_logs(served):
    """Capture every log record (root and uvicorn loggers, DEBUG) while requests carry the real key,
    wrong keys, duplicated keys and a key in the query string; no key string appears anywhere."""
    import logging

    secrets = [Served.API_KEY, "sk-wrong-secret-123", "sk-other-secret-456", "sk-query-secret-789"]
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "litestar")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        served.post(CHAT, json=chat())  # the real key
        served.post(CHAT, json=chat(stream=True))
        served.post(RUN, json=run(temperature=99))  # a 400 with the key
        served.post(CHAT, json=chat(model="nope"))  # a 404 with the key
        httpx.post(served.base_url + CHAT, json=chat(), headers={"Authorization": f"Bearer {secrets[1]}"})
        httpx.post(served.base_url + RUN, json=run(), headers={"Authorization": secrets[2]})
        httpx.post(served.base_url + CHAT + f"?api_key={secrets[3]}", json=chat())
        httpx.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {secrets[1]}"})
        send_raw(served.live.port, http("POST", CHAT, [AUTH, (b"Authorization", b"Bearer " + secrets[2].encode()),
                                                       JSON_CT, cl(GOOD)], GOOD))
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
    # not the test's own client; nor uvicorn's access log, which `toolkit serve` turns off (tested below)
    server_side = [r for r in records if not r.name.startswith(("httpx", "httpcore", "uvicorn.access"))]
    assert any(r.name == "toolkit.server.access" for r in server_side), "the capture is broken"
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in server_side)
    for secret in secrets:
        assert secret not in text


def test_serve_turns_off_uvicorns_access_log(monkeypatch):
    """uvicorn's access log would print query strings (``?api_key=...``); ours logs the path only."""
    import logging
    import signal

    import uvicorn
    from toolkit.server import serve as serve_module

    configs = []
    monkeypatch.setattr(serve_module, "build_app", lambda *a, **k: object())
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: configs.append(self.config))
    root_handlers, sigterm = list(logging.getLogger().handlers), signal.getsignal(signal.SIGTERM)
    try:
        serve_module.serve(["unused"], port=1, log_level="warning")
    finally:
        logging.getLogger().handlers[:] = root_handlers
        signal.signal(signal.SIGTERM, sigterm)
    assert len(configs) == 1 and configs[0].access_log is False


def test_model_names_are_never_turned_into_file_paths(served, monkeypatch):
    """Record every file access in the process while hostile model names are requested: none names them."""
    import builtins
    import io
    import os

    accessed: list[str] = []

    def spy(original):
        def wrapper(path, *args, **kwargs):
            accessed.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else repr(path))
            return original(path, *args, **kwargs)
        return wrapper

    for module, name in [(builtins, "open"), (io, "open"), (os, "open"), (os, "stat"), (os, "lstat"),
                         (os, "listdir"), (os, "scandir"), (os, "access")]:
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    hostile = ["../../etc/passwd", "/etc/passwd", "../../../../../../etc/shadow", "~/.ssh/id_rsa",
               "google/gemma-7b-it/../../model.onnx", "file:///etc/hosts"]
    answers = [served.post(CHAT, json=chat(model=m)) for m in hostile]
    answers += [served.post(RUN_PREFIX + m, json=run()) for m in
                ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fshadow", "@hf%2F..%2F..%2Fmodel.onnx")]
    monkeypatch.undo()
    assert [r.status_code for r in answers] == [404] * len(hostile) + [400] * 3
    assert all(r.json()["error"]["code"] == "model_not_found" for r in answers[:len(hostile)])
    assert all(r.json()["errors"][0]["code"] == 5007 for r in answers[len(hostile):])
    suspicious = [p for p in accessed if any(w in p for w in ("passwd", "shadow", "id_rsa", "hosts", "model.onnx"))]
    assert not suspicious, suspicious


def test_request_size_is_capped_with_413_in_both_schemas():
    from fake_engine import FakeEngine, LiveServer
    from toolkit.recipes import get_recipe
    from toolkit.server.app import create_app

    app = create_app({"gemma-7b-it": FakeEngine(get_recipe("gemma-7b-it"))}, max_body_bytes=4096)
    with LiveServer(app) as live:
        fits = chat(messages=[{"role": "user", "content": "x" * 3000}])
        too_big = chat(messages=[{"role": "user", "content": "x" * 5000}])
        assert httpx.post(live.base_url + CHAT, json=fits).status_code == 200
        r = httpx.post(live.base_url + CHAT, json=too_big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(live.base_url + RUN, json=run(prompt="x" * 5000))
        assert r.status_code == 413 and r.json()["errors"][0]["code"] == 3006
        chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(10))  # no Content-Length: counted as it streams
        r = httpx.post(live.base_url + RUN, content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["errors"][0]["code"] == 3006


def test_max_tokens_is_capped_at_the_context_window(served):
    # the small fake has a 64-token context: asking for more is refused, naming max_tokens
    r = served.post(CHAT, json=chat(model=SMALL, max_tokens=65))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "max_tokens is 65" in r.json()["error"]["message"] and "64 tokens" in r.json()["error"]["message"]
    r = served.post(RUN_PREFIX + "@hf/google/codegemma-7b-it", json=run(max_tokens=10**9))
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 3006
    # without max_tokens, the default (512 here) is lowered to what the context has room for
    r = served.post(CHAT, json=chat(model=SMALL, messages=[{"role": "user", "content": "capped"}]))
    assert r.status_code == 200
    sent = served.small.requests_for("capped")[-1]
    assert sent.params.max_tokens + len(sent.prompt_ids) <= 64


def test_cors_is_off_unless_configured(served):
    origin = {"Origin": "https://evil.example"}
    r = httpx.post(served.base_url + CHAT, json=chat(), headers={**served.headers, **origin})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    preflight = httpx.options(served.base_url + CHAT, headers={**origin, "Access-Control-Request-Method": "POST",
                                                              "Access-Control-Request-Headers": "authorization"})
    assert not any(h.startswith("access-control-") for h in preflight.headers)
    assert not any(h.startswith("access-control-") for h in httpx.get(served.base_url + "/health",
                                                                        headers=origin).headers)


def test_cors_when_configured_allows_only_the_given_origins():
    from fake_engine import FakeEngine, LiveServer
    from toolkit.recipes import get_recipe
    from toolkit.server.app import create_app

    app = create_app({"gemma-7b-it": FakeEngine(get_recipe("gemma-7b-it"))}, ["k"],
                     cors_origins=["https://app.example"])
    with LiveServer(app) as live:
        good = httpx.options(live.base_url + CHAT, headers={"Origin": "https://app.example",
                                                           "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
        assert good.headers.get("access-control-allow-origin") == "https://app.example"
        bad = httpx.post(live.base_url + CHAT, json=chat(), headers={"Origin": "https://evil.example",
                                                                     "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in bad.headers


def test_metrics_count_every_answer_by_status(served, http_status_counts):
    """The per-test guard (``no_server_errors``) reads these counters: they must see each answer."""
    before = http_status_counts(served)
    assert served.post(CHAT, json=chat()).status_code == 200
    assert served.post(CHAT, json=chat(temperature=99)).status_code == 400
    assert served.post(RUN, json=run(max_tokens=-1)).status_code == 400
    assert served.post(CHAT, json=chat(model="nope")).status_code == 404
    after = http_status_counts(served)
    grown = {s: after[s] - before.get(s, 0.0) for s in after if after[s] != before.get(s, 0.0)}
    assert grown.get("400") == 2 and grown.get("404") == 1 and grown.get("200", 0) >= 1, grown
