"""Issue #11 fields through the live server over a REAL tiny ONNX engine (gemma-7b-it), and FIM ids on the
tiny CodeGemma checkpoint's tokenizer.

Batched ``/v1/completions``: each choice equals that prompt sent alone under greedy decoding, in
OpenAI's order (prompt i, choice j -> index i*n + j), streamed and not. logit_bias through the API.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import LiveServer, sse_data
from toolkit.recipes import get_recipe
from toolkit.server.serve import build_app

KEY = "fields-key"
GEMMA = "google/gemma-7b-it"


@pytest.fixture(scope="module")
def served(tiny_engine):
    app = build_app([tiny_engine(get_recipe("gemma-7b-it"))], [KEY], grace_s=1.0)
    with LiveServer(app) as live:
        live.engine = app.state.ctx.models.resolve(GEMMA).engine
        yield live


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served.base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def greedy(**extra) -> dict:
    return {"model": GEMMA, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}


def alone(served, prompt) -> str:
    response = post(served, "/v1/completions", greedy(prompt=prompt))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


PROMPTS = ["The sea", "A cat sat on", "日本語 ok"]


def test_a_batch_equals_each_prompt_alone(served):
    expected = [alone(served, p) for p in PROMPTS]
    assert len(set(expected)) > 1  # the prompts give different continuations, so order is checked
    reply = post(served, "/v1/completions", greedy(prompt=PROMPTS, n=2)).json()
    assert [c["index"] for c in reply["choices"]] == list(range(6))
    assert [c["text"] for c in reply["choices"]] == [e for e in expected for _ in range(2)]
    assert reply["usage"]["completion_tokens"] == 6 * 8
    prompt_tokens = sum(len(served.engine.prompts.encode(prompt=p)) for p in PROMPTS)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens


def test_a_streamed_batch_of_token_id_lists_equals_each_prompt_alone(served):
    ids = [served.engine.prompts.encode(prompt=p) for p in PROMPTS]
    expected = [alone(served, i) for i in ids]
    response = post(served, "/v1/completions", greedy(prompt=ids, stream=True))
    texts: dict[int, str] = {}
    for data in sse_data(response.content)[:-1]:
        for choice in json.loads(data)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(3)] == expected
    assert all(e == alone(served, p) for e, p in zip(expected, PROMPTS))  # ids and text prompts agree


def test_logit_bias_through_the_api_forces_and_bans(served):
    plain = post(served, "/v1/completions", greedy(prompt="The sea", logprobs=0)).json()["choices"][0]
    token_text = served.engine.prompts.token_text
    forced_id = 45
    forced = post(served, "/v1/completions", greedy(prompt="The sea", logit_bias={str(forced_id): 100})).json()
    assert forced["choices"][0]["text"] == token_text(forced_id) * 8
    vocab = served.engine.prompts.tokenizer.get_vocab()
    plain_ids = {vocab[t] for t in plain["logprobs"]["tokens"] if t in vocab}
    banned = post(served, "/v1/completions", greedy(prompt="The sea", logprobs=0,
                                                    logit_bias={str(t): -100 for t in plain_ids})).json()
    assert banned["choices"][0]["text"] != plain["text"]


def test_tokenize_is_what_the_chat_request_sends(served):
    messages = [{"role": "user", "content": "hello there"}]
    body = post(served, "/tokenize", {"model": GEMMA, "messages": messages}).json()
    assert body["tokens"] == served.engine.prompts.encode(messages=messages)
    chat = post(served, "/v1/chat/completions", {"model": GEMMA, "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    text = post(served, "/detokenize", {"model": GEMMA, "tokens": body["tokens"]}).json()["prompt"]
    assert text.startswith("<bos><start_of_turn>user\nhello there")


def test_fim_prompt_ids_equal_tokenizing_the_fim_string(tiny_checkpoint):
    from toolkit.runtime.errors import InvalidRequestError
    from toolkit.runtime.prompting import PromptBuilder, load_tokenizer

    recipe = get_recipe("codegemma-7b-it")
    tokenizer = load_tokenizer(tiny_checkpoint(recipe))
    ids = PromptBuilder(tokenizer, recipe).encode_fim("def add(a, b):\n    ", "\n    return c")
    text = "<bos><|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    with pytest.raises(InvalidRequestError) as info:
        PromptBuilder(tokenizer, get_recipe("gemma-7b-it")).encode_fim("a", "b")
    assert info.value.param == "suffix"
