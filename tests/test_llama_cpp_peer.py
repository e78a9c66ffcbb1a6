"""The pure parts of ``benchmarks/llama_cpp_peer.py``: build and quantize command lines, the cache
lookup, llama-server's command per level, CPU-flag parsing, teacher-forced scoring, report rendering.

Nothing here builds llama.cpp or starts a server: the tools are stand-in files and scripts.
"""

from __future__ import annotations

import importlib.util
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer import fidelity, llama_build, render, runs, servers  # noqa: E402
from peer.cpu import KERNEL_FLAGS, parse_lscpu  # noqa: E402

from toolkit.bench.loadgen import RequestRecord  # noqa: E402

LSCPU_EPYC = ROOT / "tests" / "data" / "lscpu_epyc_avx512_vnni.txt"


def load_script():
    spec = importlib.util.spec_from_file_location("llama_cpp_peer", ROOT / "benchmarks" / "llama_cpp_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- build, quantize ---------------------------------------------------------------------------

def test_download_is_the_pinned_sdist_without_dependencies(tmp_path):
    layout = llama_build.Layout(tmp_path)
    command = llama_build.download_command(layout, python="py")
    assert command == ["py", "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                       "llama-cpp-python==0.3.36", "-d", str(tmp_path)]
    assert layout.source == tmp_path / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"


def test_configure_is_release_native_with_amx_off(tmp_path):
    layout = llama_build.Layout(tmp_path)
    command = llama_build.configure_command(layout, cmake="/x/cmake")
    assert command[:5] == ["/x/cmake", "-S", str(layout.source), "-B", str(tmp_path / "build")]
    options = set(command[5:])
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"} <= options
    for variable in ("CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"):
        flags = next(o for o in options if o.startswith(f"-D{variable}=")).split("=", 1)[1].split()
        assert sorted(flags) == ["-mno-amx-bf16", "-mno-amx-int8", "-mno-amx-tile"]
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in options  # the build must not fetch the web UI


def test_build_targets_exactly_the_four_tools(tmp_path):
    command = llama_build.build_command(llama_build.Layout(tmp_path), jobs=2)
    target = command.index("--target")
    assert command[target + 1: target + 5] == ["llama-server", "llama-bench", "llama-batched-bench", "llama-quantize"]
    assert command[target + 5:] == ["-j", "2"] and "Release" in command


def test_quantize_requantizes_to_q8_0():
    command = llama_build.quantize_command(Path("/b/llama-quantize"), Path("/in.gguf"), Path("/out.gguf"))
    assert command == ["/b/llama-quantize", "--allow-requantize", "/in.gguf", "/out.gguf", "Q8_0"]


def test_cached_tools_are_found_without_running_anything(tmp_path, monkeypatch):
    layout = llama_build.Layout(tmp_path)
    for name in llama_build.TARGETS:
        path = layout.tool(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def refuse(*args, **kwargs):
        raise AssertionError(f"nothing may run when the tools are cached: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    tools = llama_build.ensure_tools(layout)
    assert tools == {name: tmp_path / "build" / "bin" / name for name in llama_build.TARGETS}


def test_a_missing_tool_triggers_the_download(tmp_path, monkeypatch):
    layout = llama_build.Layout(tmp_path)
    commands = []

    def fail(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(SystemExit, match="pip download"):
        llama_build.ensure_tools(layout)
    assert commands and commands[0][1:4] == ["-m", "pip", "download"]


def test_q8_gguf_is_made_once_and_renamed_into_place(tmp_path):
    quantize = tmp_path / "llama-quantize"
    calls = tmp_path / "calls"
    quantize.write_text("#!/bin/sh\necho \"$@\" >> " + str(calls) + "\ncp \"$2\" \"$3\"\n")
    quantize.chmod(quantize.stat().st_mode | stat.S_IEXEC)
    source = tmp_path / "model-q4_k_m.gguf"
    source.write_bytes(b"GGUF weights")
    layout = llama_build.Layout(tmp_path / "cache")
    layout.root.mkdir()
    out = llama_build.ensure_q8_gguf(layout, quantize, source)
    assert out == tmp_path / "cache" / "model-q4_k_m-Q8_0.gguf" and out.read_bytes() == b"GGUF weights"
    assert not list(layout.root.glob("*.partial"))
    assert llama_build.ensure_q8_gguf(layout, quantize, source) == out
    assert len(calls.read_text().splitlines()) == 1  # the second call found it


# --- servers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("level, parallel, ctx", [(1, 1, 8192), (16, 16, 8192), (32, 32, 16384), (64, 64, 32768)])
def test_peer_plan_gives_every_stream_a_slot(level, parallel, ctx):
    plan = servers.peer_plan(level)
    assert (plan.parallel, plan.ctx) == (parallel, ctx) and ctx // parallel >= 236  # prompt + 128 tokens fit a slot
    assert plan.describe() == f"-np {parallel} -c {ctx}"


def test_llama_server_command_matches_the_issue_method():
    command = servers.llama_server_command(Path("/b/llama-server"), Path("/m.gguf"), 8721, servers.peer_plan(16), 2)
    joined = " ".join(command)
    assert command[:3] == ["/b/llama-server", "-m", "/m.gguf"]
    assert "-np 16 -c 8192 -t 2 -tb 2 --cont-batching" in joined and "--port 8721" in joined
    assert "--no-jinja --chat-template gemma" in joined  # the GGUF carries no template


# --- CPU ---------------------------------------------------------------------------------------

def test_lscpu_sample_parses_to_model_and_kernel_flags():
    cpu = parse_lscpu(LSCPU_EPYC.read_text())
    assert cpu.model == "AMD EPYC" and cpu.cpus == 2 and cpu.threads_per_core == 1 and cpu.hypervisor == "KVM"
    assert {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"} <= set(cpu.kernel_flags)
    assert not {"amx_tile", "amx_int8", "avx_vnni"} & set(cpu.kernel_flags)
    summary = cpu.summary()
    assert summary.startswith("AMD EPYC, 2 logical CPUs, KVM VM; flags: avx2 ")
    assert "absent: avx_vnni amx_tile amx_int8 amx_bf16" in summary
    assert cpu.as_dict()["kernel_flags"] == [f for f in KERNEL_FLAGS if f in cpu.flags]


def test_lscpu_without_flags_is_unknown_not_an_error():
    cpu = parse_lscpu("Architecture: x86_64\nCPU(s): n/a\n")
    assert (cpu.model, cpu.cpus, cpu.kernel_flags) == ("unknown CPU", None, [])
    assert "none of interest" in cpu.summary()


# --- fidelity ----------------------------------------------------------------------------------

def test_forced_bodies_feed_the_reference_prefix_one_position_at_a_time():
    bodies = list(fidelity.forced_bodies([2, 105], [7, 8, 9]))
    assert [body["prompt"] for body, _ in bodies] == [[2, 105], [2, 105, 7], [2, 105, 7, 8]]
    assert [expected for _, expected in bodies] == [7, 8, 9]
    assert all(b["n_predict"] == 1 and b["n_probs"] == 1 and b["cache_prompt"] for b, _ in bodies)


def test_argmax_token_reads_the_top_probability_then_the_sampled_token():
    reply = {"tokens": [5], "completion_probabilities": [
        {"id": 5, "token": "a", "top_probs": [{"id": 9, "prob": 0.6}, {"id": 5, "prob": 0.3}]}]}
    assert fidelity.argmax_token(reply) == 9
    assert fidelity.argmax_token({"tokens": [4], "completion_probabilities": []}) == 4
    with pytest.raises(ValueError):
        fidelity.argmax_token({"content": ""})


def test_agreement_and_our_manifest_numbers(tmp_path):
    assert fidelity.agreement([(1, 1), (2, 3), (4, 4), (5, 5)]) == 0.75
    with pytest.raises(ValueError):
        fidelity.agreement([])
    (tmp_path / "reference.json").write_text(json.dumps({"cases": [
        {"prompt_ids": [2], "greedy_ids": [1, 2, 3]}, {"prompt_ids": [2, 3], "greedy_ids": [4, 5, 6]}]}))
    (tmp_path / "toolkit.json").write_text(json.dumps({"precision": "int8", "validation": {
        "top1_agreement": 0.8333, "cases": [{"top1_agreement": 1.0}, {"top1_agreement": 0.6667}]}}))
    ours = fidelity.ours_top1(tmp_path)
    assert (ours["top1_agreement"], ours["positions"], ours["per_case"]) == (0.8333, 6, [1.0, 0.6667])


# --- workloads (pure parts) --------------------------------------------------------------------

def test_prefix_lines_reach_the_target_with_the_fewest_lines():
    def tokenize(text):  # 14 tokens a line plus a 12-token header/footer
        return 12 + 14 * text.count("Locker")

    lines, tokens = runs.prefix_lines_for(tokenize, 1000)
    assert tokens >= 1000 and tokenize(runs.shared_prefix_text(lines - 1)) < 1000 and lines == 71
    cached = runs.prefix_prompt("SHARED\n", 3, cached=True)
    uncached = runs.prefix_prompt("SHARED\n", 3, cached=False)
    assert cached.startswith("SHARED\n") and uncached.startswith("Run 3. SHARED\n")


def test_decode_speed_leaves_out_the_first_token():
    record = RequestRecord(start=0.0, token_times=[0.5, 0.6, 0.7, 0.9], usage_tokens=9)
    assert runs.decode_tok_s(record) == pytest.approx(8 / 0.4)  # 4 chunks carried 9 tokens
    assert runs.ttft_ms(record) == 500
    assert runs.decode_tok_s(RequestRecord(start=0.0, token_times=[0.5], usage_tokens=1)) is None
    assert runs.ttft_ms(RequestRecord(start=0.0, error="HTTP 400")) is None
    assert runs.median_of([{"x": 3}, {"x": None}, {"x": 1}, {}], "x") == 2
    assert runs.median_of([], "x") is None


def test_sides_alternate_per_round():
    script = load_script()
    assert [script.sides_in_order(i)[0] for i in range(4)] == ["ours", "llama.cpp", "ours", "llama.cpp"]


# --- rendering ---------------------------------------------------------------------------------

def level(tok_s, ttft, itl50, itl99, per_request=128.0):
    return {"output_tokens_per_s": tok_s, "ttft_ms_p50": ttft, "itl_ms_p50": itl50, "itl_ms_p99": itl99,
            "tokens_per_request": per_request}


RECORDED = {
    "meta": {"date": "2026-12-05 00:30 UTC", "command": "python benchmarks/llama_cpp_peer.py --levels 1,16",
             "cpu": parse_lscpu(LSCPU_EPYC.read_text()).as_dict(), "threads": 2, "prompt_tokens": 108,
             "max_tokens": 128, "llama_cpp": {"version": "0.3.36", "server_flags": "-np N -c max(8192, 512 x N)"}},
    "fidelity": {"ours": {"top1_agreement": 0.9765625, "positions": 256, "source": "manifest"},
                 "llama.cpp": {"top1_agreement": 0.97265625, "positions": 256}},
    "levels": [
        {"concurrency": 1, "peer_plan": "-np 1 -c 8192", "loadavg_before": 1.2, "loadavg_after": 1.9,
         "ours": level(82.4, 82, 11.4, 18.2),
         "llama.cpp": level(70.4, 1165, 12.5, 19.6)},
        {"concurrency": 16, "peer_plan": "-np 16 -c 8192", "loadavg_before": 2.1, "loadavg_after": 2.4,
         "ours": level(255.9, 725, 50.0, 354.9),
         "llama.cpp": level(165.8, 2096, 78.0, 111.4, 120.0)},
    ],
    "prefix_cache": {"prefix_tokens": 1003, "runs": 5,
                     "ours": {"uncached_ms_p50": 900.0, "cached_ms_p50": 90.0, "cached_tokens_p50": 992},
                     "llama.cpp": {"uncached_ms_p50": 1200.0, "cached_ms_p50": 150.0, "cached_tokens_p50": None}},
    "editing": {"runs": 3, "variants": {
        "ours + prediction": {"decode_tok_s_p50": 200.0, "completion_tokens_p50": 450, "accepted_p50": 400,
                              "rejected_p50": 30},
        "ours, no prediction": {"decode_tok_s_p50": 80.0, "completion_tokens_p50": 450},
        "llama.cpp": {"decode_tok_s_p50": 64.0, "completion_tokens_p50": 440}},
        "ours_outputs_identical": True},
}


def test_markdown_of_a_recorded_result():
    text = render.markdown(RECORDED)
    assert "AMD EPYC, 2 logical CPUs" in text and "avx512_vnni" in text
    assert "ours int8 **0.977**" in text and "llama.cpp Q8_0 **0.973**" in text
    assert "| 1 | 82.4 | 70.4 | 1.17× | 82 / 1,165 ms | 11.4 / 12.5 ms | 18.2 / 19.6 ms | 128 / 128 | `-np 1 -c 8192` |" in text
    assert "| 16 | 255.9 | 165.8 | 1.54× | 725 / 2,096 ms | 50.0 / 78.0 ms | 354.9 / 111.4 ms | 128 / 120 |" in text
    assert "| cached / uncached | 10% | 12% |" in text and "| cached tokens reported (median) | 992 | - |" in text
    assert "| ours + prediction | 200.0 | 3.12× | 450 | 400 / 30 |" in text
    assert "| llama.cpp | 64.0 | 1.00× | 440 | - / - |" in text
    assert "Our greedy outputs with and without `prediction` identical: yes." in text
    assert text.rstrip().endswith("The 1-minute load average was 1.2–2.4 on 2 CPUs around the levels: other processes "
                                  "shared the cores, so absolute numbers move between runs; the ratios come from one "
                                  "run with the sides alternated.")


def test_extra_serve_arguments_reach_our_command_line_and_the_report():
    args = load_script().parse_args(["--serve-arg=--waiting-served-ratio=0", "--serve-arg=--max-batch-size=16"])
    assert args.serve_args == ["--waiting-served-ratio=0", "--max-batch-size=16"]
    assert load_script().parse_args([]).serve_args == []
    meta = {**RECORDED["meta"], "serve_args": args.serve_args}
    text = render.markdown({**RECORDED, "meta": meta})
    assert "Ours: `toolkit serve --predicted-outputs --waiting-served-ratio=0 --max-batch-size=16` (default" in text
    assert "Ours: `toolkit serve --predicted-outputs` (default" in render.markdown(RECORDED)


def test_caveat_flags_an_oversubscribed_machine():
    busy = json.loads(json.dumps(RECORDED))
    busy["levels"][1]["loadavg_after"] = 12.4
    text = render.caveat(busy)
    assert "1.2–12.4 on 2 CPUs" in text and "oversubscribed" in text and "batch-1 throughput here: 70.4 tok/s" in text
    assert "oversubscribed" not in render.caveat(RECORDED)
    assert "not recorded" in render.caveat({**RECORDED, "levels": []})


def test_markdown_without_workloads_renders_the_table_only():
    text = render.markdown({k: v for k, v in RECORDED.items() if k not in ("prefix_cache", "editing")})
    assert "Prefix cache" not in text and "Editing workload" not in text and "| 16 | 255.9 |" in text


def test_readme_block_is_replaced_between_the_markers_only():
    readme = f"# T\n\nbefore\n{render.BEGIN}\nold table\n{render.END}\nafter\n"
    out = render.replace_section(readme, "new table\n")
    assert out == f"# T\n\nbefore\n{render.BEGIN}\nnew table\n{render.END}\nafter\n"
    assert render.replace_section(out, "new table\n") == out
    with pytest.raises(ValueError, match="markers"):
        render.replace_section("# no markers\n", "x")


def test_from_json_rerenders_a_saved_run(tmp_path):
    saved = tmp_path / "llama-cpp-peer.json"
    saved.write_text(json.dumps(RECORDED))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.BEGIN}\n{render.END}\n")
    load_script().main(["--from-json", str(saved), "--out", str(tmp_path / "out"), "--readme", str(readme)])
    section = readme.read_text()
    assert "| 16 | 255.9 | 165.8 | 1.54× |" in section and section.startswith("intro\n")
    assert (tmp_path / "out" / "llama-cpp-peer.md").read_text() == render.markdown(RECORDED)
    assert not (tmp_path / "out" / "llama-cpp-peer.json").exists()  # re-rendering does not rewrite the data


def test_markdown_of_the_recorded_run_in_tests_data():
    """The run the README's block came from (per-request texts trimmed): every level's row shows
    its recorded throughputs and their ratio, the CPU line names the recorded flags."""
    recorded = json.loads((ROOT / "tests" / "data" / "llama_cpp_peer_result.json").read_text())
    text = render.markdown(recorded)
    assert recorded["meta"]["cpu"]["summary"] in text
    assert recorded["levels"], "the recorded run has no HTTP table"
    for row in recorded["levels"]:
        ours, peer = row["ours"]["output_tokens_per_s"], row["llama.cpp"]["output_tokens_per_s"]
        assert f"| {row['concurrency']} | {ours:,.1f} | {peer:,.1f} | {ours / peer:.2f}× |" in text
        assert row["ours"]["tokens_per_request"] == row["llama.cpp"]["tokens_per_request"] == 128  # ignore_eos held
