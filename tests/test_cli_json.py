"""``toolkit recipes`` / ``validate`` / ``bench`` for scripts: ``--json`` on stdout, and no cut names when piped."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from toolkit.cli import main
from toolkit.recipes import all_recipes


def test_recipes_piped_never_cuts_names():
    out = CliRunner().invoke(main, ["recipes"]).output  # CliRunner's stdout is not a TTY, like a pipe
    for recipe in all_recipes():
        assert recipe.hf_id in out, recipe.hf_id
        assert all(alias in out for alias in recipe.aliases), recipe.aliases
    assert max(len(line) for line in out.splitlines()) > 80  # wider than the 80 columns rich assumes for a pipe


def test_recipes_json():
    result = CliRunner().invoke(main, ["recipes", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [r["name"] for r in data] == [r.name for r in all_recipes()]
    codegemma = next(r for r in data if r["name"] == "codegemma-7b-it")
    assert codegemma["fim"] is True and codegemma["hf_id"] == "google/codegemma-7b-it"
    assert codegemma["targets"]["onnx"] == ["fp32", "fp16", "int8"]


def test_validate_json_reports_a_bad_engine_dir(tmp_path: Path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["passed"] is False and data["error"] and data["engine_dir"].endswith("missing")


def test_validate_json_on_a_real_tiny_engine(tiny_engine):
    from toolkit.recipes import get_recipe

    engine_dir = tiny_engine(get_recipe("gemma-7b-it"))
    result = CliRunner().invoke(main, ["validate", str(engine_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] is True and data["greedy_agreement"] >= 0.9 and data["cases"]


def test_bench_json_prints_the_saved_results(tmp_path: Path, monkeypatch):
    import toolkit.bench.loadgen as loadgen

    rows = [{"concurrency": 1, "output_tokens_per_s": 10.0, "itl_ms_p50": 5.0}]

    async def fake_run_http_bench(url, model, levels, **kwargs):
        assert kwargs["ignore_eos"] is True
        return rows

    monkeypatch.setattr(loadgen, "run_http_bench", fake_run_http_bench)
    result = CliRunner().invoke(main, ["bench", "http://127.0.0.1:9", "--concurrency", "1",
                                                       "--ignore-eos", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert data["results"] == rows and data["meta"]["url"] == "http://127.0.0.1:9"
    assert json.loads(next(tmp_path.glob("*.json")).read_text()) == data
