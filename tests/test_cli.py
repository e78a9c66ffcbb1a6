"""The CLI starts without heavy imports and every subcommand's --help works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolkit.cli import main

HEAVY = ("torch", "onnxruntime", "optimum", "tensorrt_llm", "transformers", "onnx")


def _subcommands():
    return sorted(main.commands)


@pytest.mark.parametrize("args", [[], *[[name] for name in _subcommands()]])
def test_help_does_not_import_heavy_modules(args):
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        f"try:\n    main({args + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out
    assert "LOADED []" in out


def test_import_toolkit_is_light():
    code = "import sys, toolkit, toolkit.recipes; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_recipes_lists_every_recipe():
    from toolkit.recipes import all_recipes

    result = CliRunner().invoke(main, ["recipes"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for recipe in all_recipes():
        assert recipe.hf_id in result.output


def _capture_export(monkeypatch):
    from toolkit.export import pipeline

    requests = []

    def fake_export(request, reporter):
        requests.append(request)
        raise pipeline.sources.SourceError("stopped by the test")

    monkeypatch.setattr(pipeline, "run_export", fake_export)
    return requests


def test_export_defaults_are_the_recipes(monkeypatch, tmp_path):
    from toolkit.recipes import Recipe

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    requests = _capture_export(monkeypatch)
    result = CliRunner().invoke(main, ["export", "--recipe", "gemma-7b-it", "--target", "trtllm"])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert (requests[0].precision, requests[0].graph) == ("int8", "optimum")
    monkeypatch.setattr(Recipe, "default_precision_for", lambda self, target: f"{target}-default")
    CliRunner().invoke(main, ["export", "--target", "trtllm"])
    CliRunner().invoke(main, ["export", "--precision", "fp32", "--graph", "optimum", "--out", str(tmp_path / "o")])
    assert requests[1].precision == "trtllm-default" and requests[1].out_dir == tmp_path / "engines" / "default-trtllm-trtllm-default"
    assert (requests[2].precision, requests[2].graph, requests[2].out_dir) == ("fp32", "optimum", tmp_path / "o")


def test_serve_exports_the_default_engine_then_serves_it(monkeypatch, tmp_path):
    """The server only serves engine dirs; the CLI decides to export the default model first."""
    from toolkit.export import pipeline
    from toolkit.server import serve as serve_module

    served, exported = [], []
    monkeypatch.setattr(pipeline, "ensure_default_engine", lambda reporter: exported.append(reporter) or tmp_path / "d")
    monkeypatch.setattr(serve_module, "serve", lambda dirs, *a, **k: served.append((list(dirs), k)))
    (tmp_path / "empty").mkdir()
    assert CliRunner().invoke(main, ["serve"]).exit_code == 0
    assert CliRunner().invoke(main, ["serve", "--models-dir", str(tmp_path / "empty")]).exit_code == 0
    assert CliRunner().invoke(main, ["serve", str(tmp_path / "given")]).exit_code == 0
    assert [dirs for dirs, _ in served] == [[tmp_path / "d"], [tmp_path / "d"], [tmp_path / "given"]]
    assert len(exported) == 2
    missing = CliRunner().invoke(main, ["serve", "--models-dir", str(tmp_path / "missing")])
    assert missing.exit_code == 1 and "not a directory" in missing.output


def test_serve_reports_a_failed_default_export(monkeypatch):
    from toolkit.export import pipeline
    from toolkit.recipes import get_recipe

    def failing(reporter):
        get_recipe("default").check_supports("onnx", "int4")

    monkeypatch.setattr(pipeline, "ensure_default_engine", failing)
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1 and "does not support onnx at int4" in result.output


def test_server_alone_does_not_pick_an_engine():
    from toolkit.server.serve import ServeError, build_app

    with pytest.raises(ServeError, match="no engine directory to serve"):
        build_app([])
