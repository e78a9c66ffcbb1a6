"""LoRA adapters through the real server (``toolkit serve DIR --lora NAME --lora NAME=PATH``) on tiny ONNX engines."""

from __future__ import annotations

import httpx
import pytest

from fake_engine import LiveServer
from lora_fixtures import copy_engine, make_peft_adapter
from toolkit.export.lora import export_lora
from toolkit.recipes import get_recipe
from toolkit.server.serve import ServeError, build_app

KEY = "lora-key"
GEMMA = "google/gemma-7b-it"
RUN = "/client/v4/accounts/acc/ai/run/"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def dirs(tiny_engine, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    ckpt = tiny_checkpoint(get_recipe("gemma-7b-it"))
    gemma = copy_engine(tiny_engine(get_recipe("gemma-7b-it")), root / "gemma")
    export_lora(make_peft_adapter(ckpt, root / "peft-bot", seed=1), gemma, "support-bot")
    sql = export_lora(make_peft_adapter(ckpt, root / "peft-sql", seed=2, targets=("q_proj", "v_proj"), b_std=0.6),
                      gemma, "sql", out=root / "sql-export").adapter_dir
    return {"gemma": gemma, "qwen": tiny_engine(get_recipe("qwen2-7b-instruct")), "sql": sql}


@pytest.fixture(scope="module")
def served(dirs):
    app = build_app([dirs["gemma"], dirs["qwen"]], [KEY], grace_s=1.0,
                    loras=["support-bot", f"sql={dirs['sql']}"], max_loras=2)
    with LiveServer(app) as live:
        yield live


def post(served, path, body):
    return httpx.post(served.base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def complete(served, model):
    reply = post(served, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                             "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return reply.json()


def run(served, model, **fields):
    return post(served, RUN + model, {"prompt": PROMPT, "raw": True, "max_tokens": 16, "temperature": 0, **fields})


def test_openai_model_selects_the_adapter_by_name_and_base_colon_name(served):
    base = complete(served, GEMMA)["choices"][0]["text"]
    bot = complete(served, "support-bot")
    assert bot["model"] == "support-bot" and bot["usage"]["completion_tokens"] == 16
    assert bot["choices"][0]["text"] != base  # the adapter changes the output
    assert complete(served, f"{GEMMA}:support-bot")["choices"][0]["text"] == bot["choices"][0]["text"]
    sql = complete(served, "gemma-7b-it:sql")["choices"][0]["text"]  # an alias of the base works too
    assert sql not in (base, bot["choices"][0]["text"])
    assert complete(served, GEMMA)["choices"][0]["text"] == base  # the base is unchanged afterwards


def test_workers_ai_lora_selects_the_adapter_like_openai(served):
    via_openai = complete(served, "support-bot")["choices"][0]["text"]
    reply = run(served, "@hf/google/gemma-7b-it", lora="support-bot")
    assert reply.status_code == 200, reply.text
    text = reply.json()["result"]["response"]  # Workers AI stops at the stop token; the OpenAI call ignored EOS
    assert len(text) > 5 and via_openai.startswith(text)
    assert not via_openai.startswith(run(served, "@hf/google/gemma-7b-it").json()["result"]["response"])


def test_models_lists_adapters_with_their_parent(served):
    data = httpx.get(served.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    adapters = {m["id"]: m for m in data if m.get("parent")}
    assert set(adapters) == {"support-bot", "sql"}
    assert all(m["parent"] == GEMMA for m in adapters.values())


def test_adapter_errors_use_each_schemas_codes(served):
    unknown = complete_raw = post(served, "/v1/completions", {"model": f"{GEMMA}:nope", "prompt": "hi"})
    assert unknown.status_code == 404 and complete_raw.json()["error"]["code"] == "model_not_found"
    reply = run(served, "@hf/google/gemma-7b-it", lora="nope")
    assert reply.status_code == 400 and reply.json()["errors"][0]["code"] == 5007
    assert "served adapters: support-bot, sql" in reply.json()["errors"][0]["message"]
    reply = run(served, "@hf/qwen/qwen2-7b-instruct", lora="support-bot")  # a model with no adapters
    assert reply.status_code == 405 and reply.json()["errors"][0]["code"] == 5005


def test_metrics_count_tokens_per_adapter(served):
    complete(served, "sql")
    text = httpx.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    lines = [line for line in text.splitlines() if line.startswith("toolkit_completion_tokens_total{")]
    assert any(f'model="{GEMMA}:sql"' in line and float(line.rsplit(" ", 1)[1]) >= 16 for line in lines), lines


def test_serve_refuses_unknown_or_foreign_adapters(dirs):
    with pytest.raises(ServeError, match="no served engine has this adapter"):
        build_app([dirs["gemma"]], [KEY], loras=["nope"])
    with pytest.raises(ServeError, match="base model none of the served engines has"):
        build_app([dirs["qwen"]], [KEY], loras=[f"sql={dirs['sql']}"])


def test_prediction_on_an_engine_serving_adapters_changes_nothing_and_reports_no_counts(served):
    """An engine serving LoRA adapters does not draft from OpenAI's ``prediction`` (no speculator): the reply
    is the one without it and usage has no ``completion_tokens_details`` (server/openai/routes.py:
    counts_prediction); the engine next to it without adapters drafts from it and reports the counts."""
    def chat(model, **extra):
        reply = post(served, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                                                      "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra})
        assert reply.status_code == 200, reply.text
        return reply.json()

    for model, drafts in (("support-bot", False), (GEMMA, False), ("qwen2-7b-instruct", True)):
        plain = chat(model)
        text = plain["choices"][0]["message"]["content"]
        predicted = chat(model, prediction={"type": "content", "content": text})
        assert predicted["choices"][0]["message"]["content"] == text, model
        assert ("completion_tokens_details" in predicted["usage"]) is drafts, (model, predicted["usage"])
