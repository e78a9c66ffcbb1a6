"""toolkit serve --ray on a local Ray cluster: 2 replicas of a tiny engine (1 thread each) behind
Ray Serve's proxy. One cluster per module; the tests run in file order (the last one redeploys
with autoscaling)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from toolkit.recipes import get_recipe

pytestmark = pytest.mark.ray

import ray  # noqa: E402  (the ray extra; ./dev.sh test installs it)
from ray import serve  # noqa: E402

from toolkit.scale import ray_serve  # noqa: E402
from toolkit.scale.options import ScaleOptions  # noqa: E402

KEY = "sk-ray-test"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WAI_PATH = "/client/v4/accounts/acct/ai/run/@hf/google/gemma-7b-it"
ADAPTERS = ("support-bot", "sql")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, engine_dir, port, loras=()):
        self.engine_dir = engine_dir
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.loras = list(loras)

    def deploy(self, options: ScaleOptions) -> None:
        ray_serve.deploy([self.engine_dir], [KEY], options, port=self.port, grace_s=10, public_metrics=False,
                         loras=self.loras, max_loras=2)

    def replicas(self) -> list[dict]:
        """The live replicas' info; a replica that died since the broadcast went out answers with an
        exception (``ActorDiedError``, while Ray replaces a killed one), which is left out."""
        handle = serve.get_deployment_handle(ray_serve.DEPLOYMENT_NAME, ray_serve.APP_NAME)
        results = handle.broadcast("replica_info").results(timeout_s=30, return_exceptions=True)
        return [r for r in results if isinstance(r, dict)]

    def running(self) -> int:
        status = serve.status().applications[ray_serve.APP_NAME].deployments[ray_serve.DEPLOYMENT_NAME]
        return status.replica_states.get("RUNNING", 0)

    def metrics(self) -> dict[tuple[str, str], float]:
        """``{(metric name, replica): value}`` of the engine gauges in the merged /metrics."""
        text = httpx.get(self.url + "/metrics", headers=HEADERS, timeout=30).text
        out = {}
        for line in text.splitlines():
            if line.startswith(("toolkit_kv_cache_used_tokens{", "toolkit_running_requests{")):
                name = line.split("{", 1)[0]
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                out[(name, replica)] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def cluster(tiny_engine, tiny_checkpoint, tmp_path_factory):
    from lora_fixtures import copy_engine, make_peft_adapter

    from toolkit.export.lora import export_lora

    root = tmp_path_factory.mktemp("ray-engine")
    engine_dir = copy_engine(tiny_engine(get_recipe("gemma-7b-it"), "fp32"), root / "gemma")
    ckpt = tiny_checkpoint(get_recipe("gemma-7b-it"))
    for seed, name in enumerate(ADAPTERS, start=1):  # two LoRA adapters the replicas serve (section "adapters")
        export_lora(make_peft_adapter(ckpt, root / f"peft-{name}", seed=seed), engine_dir, name)
    ray_serve.init_ray(num_cpus=4, logging_level="WARNING", log_to_driver=False)
    try:
        c = Cluster(engine_dir, _free_port(), loras=ADAPTERS)
        c.deploy(ScaleOptions(replicas=2, threads=1, grace_s=10, health_check_period_s=1))
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(stream: bool, max_tokens: int = 8, **extra) -> dict:
    return {"model": "gemma-7b-it", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": max_tokens,
            "stream": stream, **extra}


def _wait(predicate, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_both_schemas_streaming_errors_health_and_metrics_through_ray(cluster):
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=cluster.url + "/v1", max_retries=0)
    reply = client.chat.completions.create(model="gemma-7b-it", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1

    # streamed token by token: the events of one stream arrive over time, not in one buffered piece
    arrivals, pieces = [], []
    stream = client.chat.completions.create(model="gemma-7b-it", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 50
    spread = arrivals[-1] - arrivals[0]
    assert spread > 0.1 and len({round(t, 2) for t in arrivals}) > 10, (spread, len(arrivals))

    r = httpx.post(cluster.url + WAI_PATH, headers=HEADERS, json={"prompt": "Hi", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["result"]["usage"]["completion_tokens"] >= 1
    with httpx.stream("POST", cluster.url + WAI_PATH, headers=HEADERS, json={"prompt": "Hi", "max_tokens": 5, "stream": True},
                      timeout=60) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and "usage" in json.loads(lines[-2].removeprefix("data: "))

    # the app's error envelopes come through the proxy unchanged
    r = httpx.post(cluster.url + "/v1/chat/completions", json=_chat(False), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(cluster.url + WAI_PATH.replace("gemma-7b-it", "nope"), headers=HEADERS, json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5007
    r = httpx.post(cluster.url + "/v1/chat/completions", headers=HEADERS, json=_chat(False, max_tokens=-1), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    assert httpx.get(cluster.url + "/health", timeout=30).json()["status"] == "ok"
    ids = {info["replica"] for info in cluster.replicas()}
    assert len(ids) == 2
    assert {replica for (_, replica) in cluster.metrics()} == ids  # /metrics shows every replica


def _served_by(cluster, path: str, body: dict) -> str:
    r = httpx.post(cluster.url + path, headers=HEADERS, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "x-toolkit-adapters" not in r.headers  # the proxy keeps the replicas' adapter list to itself
    return r.headers["x-toolkit-replica"]


def test_each_replica_gets_its_share_of_the_machines_default_kv_budget(cluster):
    """2 replicas of 1 CPU on a 4-CPU local cluster, no --kv-cache-gib: each engine's budget is the
    machine's default halved (scale/options.py: replica_kv_budgets), computed in the replica's process."""
    from toolkit.artifact.manifest import load_manifest
    from toolkit.runtime.kv_cache import BLOCK, KvGeometry, default_kv_budget_bytes, machine_memory_bytes

    manifest = load_manifest(cluster.engine_dir, verify_hashes=False)
    per_token = KvGeometry.of_layout(manifest.kv_layout).bytes_per_token
    share = default_kv_budget_bytes(per_token, manifest.context_length, machine_memory_bytes() // 2)
    budgets = [s["memory"]["kv_budget"] for i in _wait(lambda: len(cluster.replicas()) == 2 and cluster.replicas(), 30)
               for s in i["stats"].values()]
    assert budgets == [share // (per_token * BLOCK) * per_token * BLOCK] * 2


def test_adapter_requests_go_to_the_replica_that_loaded_the_adapter(cluster):
    def complete(model):
        return _served_by(cluster, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})

    def loaded():
        return {i["replica"]: set(next(iter(i["adapters_loaded"].values()))) for i in cluster.replicas()}

    assert not any(loaded().values()), loaded()  # nothing loaded before a request asks
    base = set()
    for _ in range(40):  # a base request works on both replicas (and the proxy learns the adapter names)
        base.add(complete("gemma-7b-it"))
        if len(base) == 2:
            break
    assert len(base) == 2, base
    homes = {}
    for name in ADAPTERS:
        first = complete(name)
        time.sleep(1.0)  # the replica reports the adapter to Ray's controller, which tells the proxy's router
        served = {first}
        served |= {complete(name) for _ in range(5)}
        served |= {complete(f"google/gemma-7b-it:{name}") for _ in range(3)}
        served |= {_served_by(cluster, WAI_PATH, {"prompt": "Hi", "max_tokens": 2, "lora": name}) for _ in range(3)}
        served |= {_served_by(cluster, "/v1/chat/completions", _chat(False, max_tokens=2, model=name)) for _ in range(2)}
        assert served == {first}, (name, served)  # every request for the adapter landed on one replica
        homes[name] = first
    # the second adapter went to the replica holding none (Ray: fewest models first), each loaded only at home
    assert homes["support-bot"] != homes["sql"], homes
    assert loaded() == {homes["support-bot"]: {"support-bot"}, homes["sql"]: {"sql"}}, loaded()
    multiplexed = {i["replica"]: set(i["adapters_multiplexed"]) for i in cluster.replicas()}
    assert multiplexed == {homes["support-bot"]: {"support-bot"}, homes["sql"]: {"sql"}}, multiplexed
    # base requests still use both replicas
    base = set()
    for _ in range(40):
        base.add(complete("gemma-7b-it"))
        if len(base) == 2:
            break
    assert len(base) == 2, base


def test_cancelled_stream_frees_its_replicas_cache(cluster):
    def busy():
        return [i for i in cluster.replicas() if any(s["kv_cache_used_tokens"] > 0 for s in i["stats"].values())]

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", cluster.url + "/v1/chat/completions", headers=HEADERS,
                         json=_chat(True, max_tokens=480, ignore_eos=True)) as s:
            events = (line for line in s.iter_lines() if line)
            for _ in range(3):
                assert next(events).startswith("data: ")
            holding = _wait(busy, 10, 0.05)
            assert len(holding) == 1, "one replica holds the stream's KV cache while it streams"
        # the client went away mid-stream
    freed = _wait(lambda: not busy(), 15)
    assert freed, cluster.replicas()
    gauges = cluster.metrics()
    assert gauges and all(v == 0 for v in gauges.values()), gauges


def _stream_outcome(url: str, body: dict, path: str = "/v1/chat/completions") -> str:
    """'done', 'error-event' (the last event is an error envelope) or 'status-<code>'; never hangs (timeout)."""
    try:
        with httpx.stream("POST", url + path, headers=HEADERS, json=body, timeout=httpx.Timeout(60, read=30)) as s:
            if s.status_code != 200:
                s.read()
                payload = s.json()
                if s.status_code == 503:
                    assert payload["error"]["code"] == "engine_unavailable" and s.headers["retry-after"] == "1"
                return f"status-{s.status_code}"
            last = None
            for line in s.iter_lines():
                if line:
                    last = line
        if last == "data: [DONE]":
            return "done"
        payload = json.loads(last.removeprefix("data: "))
        assert payload["error"]["code"] == "engine_unavailable", payload
        return "error-event"
    except httpx.TransportError as exc:
        return f"transport-{type(exc).__name__}"


def test_killed_replica_loses_only_its_requests_and_the_endpoint_keeps_answering(cluster):
    before = cluster.replicas()
    assert len(before) == 2
    victim = before[0]
    body = _chat(True, max_tokens=400, ignore_eos=True)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_stream_outcome, cluster.url, body) for _ in range(8)]
        assert _wait(lambda: all(any(s["running"] for s in i["stats"].values()) for i in cluster.replicas()), 20, 0.05), \
            "both replicas are busy before the kill"
        os.kill(victim["pid"], signal.SIGKILL)
        # while Ray replaces it, the endpoint keeps answering
        during = [_stream_outcome(cluster.url, _chat(True, max_tokens=4)) for _ in range(4)]
        outcomes = [f.result(timeout=90) for f in futures]
    assert all(o in ("done", "error-event", "status-503") for o in outcomes), outcomes
    assert 1 <= outcomes.count("done") <= 7, outcomes  # the survivor's streams finished, the victim's did not
    assert during.count("done") >= 3, during
    replaced = _wait(lambda: cluster.running() == 2 and len({i["pid"] for i in cluster.replicas()} - {victim["pid"]}) == 2, 90, 1)
    assert replaced, serve.status()
    assert _stream_outcome(cluster.url, _chat(True, max_tokens=4)) == "done"


def test_autoscales_from_one_to_two_replicas_under_load_and_back(cluster):
    cluster.deploy(ScaleOptions(min_replicas=1, max_replicas=2, target_ongoing_requests=2, threads=1, grace_s=10,
                                upscale_delay_s=1, downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2,
                                health_check_period_s=1))
    assert _wait(lambda: cluster.running() == 1, 60, 0.5), serve.status()
    stop = threading.Event()
    outcomes: list[str] = []

    def load():
        while not stop.is_set():
            outcomes.append(_stream_outcome(cluster.url, _chat(True, max_tokens=200, ignore_eos=True)))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        scaled_up = _wait(lambda: cluster.running() == 2, 90, 0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert scaled_up, serve.status()
    # a trickle below the target: Ray scales back to one replica; a replica removed mid-request lets it finish
    trickle: list[str] = []
    deadline = time.monotonic() + 90
    while cluster.running() != 1 and time.monotonic() < deadline:
        trickle.append(_stream_outcome(cluster.url, _chat(True, max_tokens=16)))
    assert cluster.running() == 1, serve.status()
    assert outcomes and all(o == "done" for o in outcomes), outcomes
    assert trickle and all(o == "done" for o in trickle), trickle
