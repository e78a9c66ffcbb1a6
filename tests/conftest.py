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
