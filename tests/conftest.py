"""Shared fixtures: tiny checkpoints and engine directories, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import skip_policy  # noqa: E402
from fake_trtllm import FakeTrtLlm  # noqa: E402
from tiny_models import build_tiny_checkpoint  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """A run fails when any test without the ``gpu`` marker was skipped (see skip_policy.py)."""
    skip_policy.pytest_configure(config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint(recipe) -> Path`` of a tiny random checkpoint of the recipe's architecture."""
    built: dict[tuple[str, str], Path] = {}

    def make(recipe) -> Path:
        key = (recipe.architecture, recipe.chat_format)
        if key not in built:
            out = tmp_path_factory.mktemp(f"ckpt-{recipe.architecture}-{recipe.chat_format}")
            built[key] = build_tiny_checkpoint(recipe.architecture, recipe.chat_format, out)
        return built[key]

    return make


@pytest.fixture
def no_trtllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT-LLM made unimportable, whether or not it is installed."""
    for name in ("tensorrt_llm", "tensorrt_llm._tensorrt_engine", "tensorrt_llm.llmapi"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` raise ImportError


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory, tiny_checkpoint):
    """Factory: ``tiny_engine(recipe, precision, graph) -> Path`` of an exported, validated tiny ONNX engine dir."""
    from toolkit.export.pipeline import ExportRequest, run_export
    from toolkit.export.progress import StageReporter

    built: dict[tuple[str, str], Path] = {}

    def make(recipe, precision: str = "fp32", graph: str = "optimum") -> Path:
        key = (recipe.name, precision, graph)
        if key not in built:
            out = tmp_path_factory.mktemp("engines") / f"{recipe.name}-{graph}-{precision}"
            request = ExportRequest(recipe, "onnx", precision, out, tiny_checkpoint(recipe), graph=graph)
            run_export(request, StageReporter(quiet=True))
            built[key] = out
        return built[key]

    return make


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> FakeTrtLlm:
    """A fake ``tensorrt_llm`` installed in ``sys.modules`` for one test (see fake_trtllm.py)."""
    fake = FakeTrtLlm()
    fake.install(monkeypatch)
    return fake


@pytest.fixture(scope="module")
def served():
    """The app over FakeEngines (see ``fake_engine.Served``), live on 127.0.0.1, one per test module.

    test_server_real.py and test_server_default_model.py define their own ``served`` over real engines.
    """
    from fake_engine import Served

    with Served() as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    """The official ``openai`` client pointed at ``served`` (no retries)."""
    import openai
    from fake_engine import Served

    return openai.OpenAI(api_key=Served.API_KEY, base_url=f"{served.base_url}/v1", max_retries=0)


@pytest.fixture(scope="module")
def cf(served):
    """The ``cloudflare`` SDK pointed at ``served`` (no retries)."""
    import cloudflare
    from fake_engine import Served

    return cloudflare.Cloudflare(api_token=Served.API_KEY, base_url=f"{served.base_url}/client/v4", max_retries=0)


def _http_status_counts(served) -> dict[str, float]:
    """``toolkit_http_requests_total`` from ``served``'s /metrics, summed by status code."""
    import httpx

    text = httpx.get(served.base_url + "/metrics", headers=served.headers, timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("toolkit_http_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.fixture
def http_status_counts():
    """``counts(served) -> {status: n}``: the HTTP answers ``served``'s /metrics has counted so far."""
    return _http_status_counts


@pytest.fixture
def no_server_errors(served):
    """After the test: no 5xx answer was counted while it ran, and every fake engine is idle with its
    cache freed. Makes each test of a module that uses it check the server's health on its own."""
    from fake_engine import wait_until

    before = _http_status_counts(served)
    yield
    after = _http_status_counts(served)
    new_5xx = {s: n - before.get(s, 0.0) for s, n in after.items() if s.startswith("5") and n > before.get(s, 0.0)}
    assert not new_5xx, f"5xx answers during the test: {new_5xx}"
    engines = (served.gemma, served.default, served.small)
    idle = lambda: all(e.stats().running == 0 and e.stats().kv_cache_used_tokens == 0 for e in engines)  # noqa: E731
    assert wait_until(idle), [e.stats() for e in engines]
