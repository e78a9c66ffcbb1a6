"""Our server vs llama.cpp's own C++ server (llama-server), side by side in one run (issue 13, item 6).

One command, from a fresh clone:

    python benchmarks/llama_cpp_peer.py [--levels 1,16,32,64] [--waves 2] [--threads 2] \\
        [--markdown-out bench-results/llama-cpp-peer.md] [--readme README.md]

1. builds (or finds, in ``~/.cache/toolkit/llama.cpp-0.3.36/``) llama-server, llama-bench,
   llama-batched-bench and llama-quantize from the llama.cpp sources vendored in the
   ``llama-cpp-python`` 0.3.36 sdist (cmake Release, ``GGML_NATIVE=ON``, AMX off; ``peer/llama_build.py``);
2. requantizes the default model's packaged GGUF (Q4_K_M) to Q8_0, the weight precision of our int8;
3. checks both sides' fidelity: teacher-forced top-1 against our fp32 reference on the golden
   positions ``toolkit validate`` scores (``peer/fidelity.py``);
4. runs issue 13's HTTP table at each concurrency level against ``toolkit serve`` (default model,
   int8) and ``llama-server`` (as many slots as streams, ``peer/servers.py``), alternating which side
   goes first per level, then the prefix-cache and editing workloads at batch 1 (``peer/runs.py``);
5. prints the CPU model and flags, saves ``llama-cpp-peer.json`` and a Markdown report under
   ``--out``; ``--readme`` rewrites the README's generated block; ``--from-json`` re-renders a saved run.

Every figure is one run on a possibly shared machine: the JSON records the load average per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import fidelity, llama_build, render, runs  # noqa: E402
from peer.cpu import read_cpu  # noqa: E402
from peer.servers import Server, free_port, llama_server_command, ours_command, ours_env, peer_plan  # noqa: E402

OURS, PEER = render.OURS, render.PEER
EDIT_VARIANTS = ("ours + prediction", "ours, no prediction", PEER)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,16,32,64", help="comma-separated concurrency levels")
    p.add_argument("--waves", type=int, default=2, help="requests per level = max(4, waves x concurrency)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prefix-runs", type=int, default=5, help="prefix-cache runs per kind and side (0: skip)")
    p.add_argument("--editing-runs", type=int, default=3, help="editing-workload runs per variant (0: skip)")
    p.add_argument("--editing-max-tokens", type=int, default=600)
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[], metavar="ARG",
                   help="one more toolkit serve argument for our server, repeatable, in the = form (--serve-arg=--waiting-served-ratio=0)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compilers when building llama.cpp")
    p.add_argument("--port-ours", type=int, default=0, help="default: a free port")
    p.add_argument("--port-peer", type=int, default=0, help="default: a free port")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for a server (first run exports)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--markdown-out", type=Path, default=None, help="Markdown report (default: OUT/llama-cpp-peer.md)")
    p.add_argument("--readme", type=Path, default=None, help="rewrite this file's generated llama-cpp-peer block")
    p.add_argument("--from-json", type=Path, default=None, help="only render a saved llama-cpp-peer.json")
    p.add_argument("--build-only", action="store_true", help="build the tools and the Q8_0 GGUF, then stop")
    return p.parse_args(argv)


def prepare_peer(args: argparse.Namespace) -> tuple[dict[str, Path], Path, Path]:
    """The llama.cpp tools, the packaged GGUF and its Q8_0 requantization (built / made once)."""
    layout = llama_build.Layout(llama_build.cache_root())
    tools = llama_build.ensure_tools(layout, args.jobs)
    source = llama_build.default_gguf()
    q8 = llama_build.ensure_q8_gguf(layout, tools["llama-quantize"], source)
    print(f"llama.cpp tools: {tools['llama-server'].parent}; GGUF: {source.name} -> {q8}", flush=True)
    return tools, source, q8


def start_peer(args: argparse.Namespace, binary: Path, gguf: Path, level: int) -> Server:
    """llama-server for ``level`` streams, ready."""
    command = llama_server_command(binary, gguf, args.port_peer, peer_plan(level), args.threads)
    server = Server(PEER, command, f"http://127.0.0.1:{args.port_peer}", args.out / "llama-cpp-peer-logs" / "llama-server.log")
    server.wait_ready(args.ready_timeout)
    return server


def sides_in_order(index: int) -> tuple[str, str]:
    """Which side goes first in round ``index``: ours on even rounds, the peer on odd ones."""
    return (OURS, PEER) if index % 2 == 0 else (PEER, OURS)


def run_level(args: argparse.Namespace, index: int, level: int, urls: dict[str, str], models: dict[str, str]) -> dict:
    """One row of the HTTP table, both sides, in alternating order."""
    row: dict[str, Any] = {"concurrency": level, "peer_plan": peer_plan(level).describe(),
                           "first": sides_in_order(index)[0], "loadavg_before": os.getloadavg()[0]}
    for side in sides_in_order(index):
        print(f"[{side}] concurrency {level}", flush=True)
        row[side] = asyncio.run(runs.http_level(urls[side], models[side], level, args.waves, args.prompt_tokens,
                                                args.max_tokens))
    row["loadavg_after"] = os.getloadavg()[0]
    for side in (OURS, PEER):
        r = row[side]
        print(f"  {side}: {r['output_tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_ms_p50']:.0f} ms, ITL p50/p99 "
              f"{r['itl_ms_p50']:.1f}/{r['itl_ms_p99']:.1f} ms, {r['tokens_per_request']} tokens/request, "
              f"{r['errors']} errors", flush=True)
    return row


def run_prefix(args: argparse.Namespace, urls: dict[str, str], models: dict[str, str]) -> dict:
    """Prefix-cache TTFT at batch 1, both sides, cached and uncached runs alternated."""
    import httpx

    def tokenize(text: str) -> int:
        reply = httpx.post(f"{urls[PEER]}/tokenize", json={"content": text}, timeout=60)
        return len(reply.json()["tokens"])

    lines, tokens = runs.prefix_lines_for(tokenize)
    shared = runs.shared_prefix_text(lines)
    series: dict[str, dict[str, list]] = {side: {"uncached": [], "cached": []} for side in (OURS, PEER)}
    for side in (OURS, PEER):  # warm-up: puts the shared prefix into each side's cache
        asyncio.run(runs.prefix_case(urls[side], models[side], runs.prefix_prompt(shared, args.prefix_runs, True)))
    for k in range(args.prefix_runs):
        for side in sides_in_order(k):
            for kind in ("uncached", "cached") if k % 2 == 0 else ("cached", "uncached"):
                case = asyncio.run(runs.prefix_case(urls[side], models[side], runs.prefix_prompt(shared, k, kind == "cached")))
                series[side][kind].append(case)
                print(f"  prefix run {k} {side} {kind}: TTFT {case['ttft_ms']} ms, cached tokens {case['cached_tokens']}",
                      flush=True)
    summary: dict[str, Any] = {"prefix_tokens": tokens, "prefix_lines": lines, "runs": args.prefix_runs}
    for side, kinds in series.items():
        summary[side] = {
            "uncached_ms_p50": runs.median_of(kinds["uncached"], "ttft_ms"),
            "cached_ms_p50": runs.median_of(kinds["cached"], "ttft_ms"),
            "cached_tokens_p50": runs.median_of(kinds["cached"], "cached_tokens"),
            "runs": kinds,
        }
    return summary


def run_editing(args: argparse.Namespace, urls: dict[str, str], models: dict[str, str]) -> dict:
    """The editing workload at batch 1: ours with and without ``prediction``, llama-server without."""
    plan = {"ours + prediction": (OURS, True), "ours, no prediction": (OURS, False), PEER: (PEER, False)}
    rows: dict[str, list[dict]] = {name: [] for name in EDIT_VARIANTS}
    for k in range(args.editing_runs):
        order = EDIT_VARIANTS[k % 3:] + EDIT_VARIANTS[: k % 3]
        for name in order:
            side, prediction = plan[name]
            case = asyncio.run(runs.editing_case(urls[side], models[side], args.editing_max_tokens, prediction))
            rows[name].append(case)
            print(f"  editing run {k} {name}: {case['decode_tok_s']} tok/s, {case['completion_tokens']} tokens, "
                  f"accepted {case['accepted_prediction_tokens']}, error {case['error']}", flush=True)
    variants = {name: {"decode_tok_s_p50": runs.median_of(cases, "decode_tok_s"),
                       "completion_tokens_p50": runs.median_of(cases, "completion_tokens"),
                       "accepted_p50": runs.median_of(cases, "accepted_prediction_tokens"),
                       "rejected_p50": runs.median_of(cases, "rejected_prediction_tokens"),
                       "prompt_tokens": cases[0]["prompt_tokens"] if cases else None, "runs": cases}
                for name, cases in rows.items()}
    ours_texts = {case["text"] for name in EDIT_VARIANTS[:2] for case in rows[name] if not case["error"]}
    return {"runs": args.editing_runs, "variants": variants, "ours_outputs_identical": len(ours_texts) == 1}


def measure_fidelity(engine_dir: Path, peer_url: str) -> dict:
    """Both sides' teacher-forced top-1 against the fp32 reference stored with our engine."""
    scores = {OURS: fidelity.ours_top1(engine_dir), PEER: fidelity.peer_top1(peer_url, engine_dir / "reference.json")}
    print(f"fidelity: {json.dumps({side: v['top1_agreement'] for side, v in scores.items()})}", flush=True)
    return scores


def write_json(result: dict, out: Path) -> Path:
    """``OUT/llama-cpp-peer.json`` (rewritten after every phase, so an interrupted run keeps its data)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "llama-cpp-peer.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def measure(args: argparse.Namespace, levels: list[int], meta: dict) -> dict:
    """Start the servers, run fidelity, the table and the workloads; stop everything."""
    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter

    tools, source, q8 = prepare_peer(args)
    engine_dir = ensure_default_engine(StageReporter(quiet=True))
    meta.update(gguf={"source": str(source), "q8_0": str(q8)}, engine=str(engine_dir), serve_args=args.serve_args)
    logs = args.out / "llama-cpp-peer-logs"
    ours = Server(OURS, ours_command(args.port_ours) + args.serve_args, f"http://127.0.0.1:{args.port_ours}", logs / "toolkit.log",
                  env=ours_env(args.threads))
    result: dict[str, Any] = {"meta": meta, "levels": [], "failures": []}
    peer: Server | None = None

    def phase(name: str, work) -> None:
        """Run one measurement; a failure is recorded and the others still run; the JSON so far is saved."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - one broken workload must not lose the table
            result["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"{name} failed: {exc!r}", flush=True)
        write_json(result, args.out)

    try:
        ours.wait_ready(args.ready_timeout)
        urls, models = {OURS: ours.url}, {OURS: ours.model()}
        peer = start_peer(args, tools["llama-server"], q8, 1)  # one slot: fidelity, level 1, batch-1 workloads
        urls[PEER], models[PEER] = peer.url, peer.model()
        phase("fidelity", lambda: result.update(fidelity=measure_fidelity(engine_dir, peer.url)))
        if args.prefix_runs:  # batch 1, on the one-slot server (a slot holds the ~1,000-token prefix)
            phase("prefix cache", lambda: result.update(prefix_cache=run_prefix(args, urls, models)))
        if args.editing_runs:
            phase("editing", lambda: result.update(editing=run_editing(args, urls, models)))
        for index, level in enumerate(sorted(set(levels))):
            if level != 1:
                peer.stop()
                peer = start_peer(args, tools["llama-server"], q8, level)
                urls[PEER] = peer.url
            phase(f"concurrency {level}", lambda: result["levels"].append(run_level(args, index, level, urls, models)))
    finally:
        if peer is not None:
            peer.stop()
        ours.stop()
    return result


def save(result: dict, args: argparse.Namespace) -> None:
    """Write the JSON and the Markdown report; rewrite the README block when asked."""
    if args.from_json is None:
        write_json(result, args.out)
    text = render.markdown(result)
    markdown_out = args.markdown_out or args.out / "llama-cpp-peer.md"
    markdown_out.parent.mkdir(parents=True, exist_ok=True)
    markdown_out.write_text(text)
    print(text)
    print(f"saved {markdown_out}" + ("" if args.from_json else f" and {args.out / 'llama-cpp-peer.json'}"))
    if args.readme:
        args.readme.write_text(render.replace_section(args.readme.read_text(), text))
        print(f"rewrote the generated block of {args.readme}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop both servers on SIGTERM too (finally)
    args.port_ours = args.port_ours or free_port()
    while not args.port_peer or args.port_peer == args.port_ours:
        args.port_peer = free_port()
    if args.from_json:
        save(json.loads(args.from_json.read_text()), args)
        return
    cpu = read_cpu()
    print(f"CPU: {cpu.summary()}", flush=True)
    if args.build_only:
        prepare_peer(args)
        return
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python benchmarks/llama_cpp_peer.py", *(argv if argv is not None else sys.argv[1:])]),
            "cpu": cpu.as_dict(), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "waves": args.waves,
            "llama_cpp": {"version": llama_build.LLAMA_CPP_PYTHON_VERSION,
                          "server_flags": f"-np N -c max(8192, 512 x N) -t {args.threads} -tb {args.threads} --cont-batching",
                          "configure": llama_build.configure_command(llama_build.Layout(llama_build.cache_root()))[3:]}}
    save(measure(args, levels, meta), args)


if __name__ == "__main__":
    main()
