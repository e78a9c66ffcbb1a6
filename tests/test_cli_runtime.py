"""`toolkit generate` and `toolkit bench --offline` on a tiny engine."""

from __future__ import annotations

import json

from click.testing import CliRunner

from toolkit.cli import main
from toolkit.recipes import get_recipe


def test_generate_streams_greedy_text(tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32")
    args = ["generate", str(engine_dir), "--message", "user:What is the capital of France?", "--max-tokens", "6", "--temperature", "0"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "completion_tokens=" in first.output
    assert first.output == second.output  # greedy is deterministic


def test_generate_rejects_bad_input(tiny_engine):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32")
    both = CliRunner().invoke(main, ["generate", str(engine_dir), "--prompt", "x", "--message", "user:y"])
    assert both.exit_code != 0 and "exactly one" in both.output
    bad = CliRunner().invoke(main, ["generate", str(engine_dir), "--prompt", "x", "--temperature", "9"])
    assert bad.exit_code != 0 and "temperature" in bad.output


def test_bench_offline_writes_table_json_and_png(tiny_engine, tmp_path):
    engine_dir = tiny_engine(get_recipe("gemma-7b-it"), "fp32")
    result = CliRunner().invoke(
        main,
        ["bench", "--offline", "--engine", str(engine_dir), "--concurrency", "1,3", "--prompt-tokens", "16",
         "--max-tokens", "8", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / f"offline-{engine_dir.name}.json").read_text())
    assert [r["concurrency"] for r in data["results"]] == [1, 3]
    assert [r["output_tokens"] for r in data["results"]] == [8, 24]
    assert all(r["output_tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0 for r in data["results"])
    assert (tmp_path / f"offline-{engine_dir.name}.png").stat().st_size > 1000
