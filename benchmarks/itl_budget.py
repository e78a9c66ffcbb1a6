"""Inter-token latency against time to first token as the step time budget varies (issue 13, smooth streams).

Issue 13's shape: 16 concurrent streams, 108-token prompts, 128 tokens each with ``ignore_eos``,
through the ``toolkit bench`` load generator (``toolkit.bench.loadgen.run_http_bench``). For each
``--step-budget-ms`` value (``off`` = the token budget alone) a fresh ``toolkit serve`` on the
default model (int8 gqa engine) is started, warmed up and measured; the budgets run in alternating
order over ``--rounds`` rounds (forward, then backward, ...) so that a change of background load
does not favour one budget. ``--peer`` adds llama.cpp's ``llama-server`` (Q8_0, a slot per stream,
as ``benchmarks/llama_cpp_peer.py`` builds it) as one more column of each round, when its tools
are already built.

ITL as the load generator measures it: every gap between two streamed content chunks of a request,
pooled over all requests, p50/p99 of that pool (``toolkit.bench.offline.summarize``).

    python benchmarks/itl_budget.py [--budgets off,150,100,60,40] [--rounds 2] [--requests 64] [--peer]
    python benchmarks/itl_budget.py --chunks   # prompt-chunk and decode cost on the engine, no server
    python benchmarks/itl_budget.py --simulate bench-results/itl_budget/chunks-*.json   # the curve without noise

``--chunks`` times the engine's own runner: one prompt chunk of 8..512 tokens (after 0 and 256
cached tokens) and a decode step of 1..16 rows, sizes interleaved and repeated, medians; it is what
chose ``SchedulerConfig.min_prefill_chunk``. Prints the CPU (``lscpu`` model and kernel flags) and
the load average around each run; saves JSON under ``--out``. ``--simulate`` replays the HTTP run's
closed loop (each client resubmits when its request ends) on the real ``Scheduler`` with time
advanced by that measured cost: the same curve without other processes' noise, and cheap enough to
try budgets and ``min_prefill_chunk`` values before measuring them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import llama_build  # noqa: E402
from peer.cpu import read_cpu  # noqa: E402
from peer.servers import Server, llama_server_command, ours_command, ours_env, peer_plan  # noqa: E402

from toolkit.bench.loadgen import run_http_bench  # noqa: E402

DEFAULT_ENGINE = Path.home() / ".cache" / "toolkit" / "engines" / "default-onnx-gqa-int8"
PEER = "llama-server"
COLUMNS = (("output_tokens_per_s", "tok/s", "{:.1f}"), ("ttft_ms_p50", "TTFT p50", "{:.0f}"),
           ("ttft_ms_p99", "TTFT p99", "{:.0f}"), ("itl_ms_p50", "ITL p50", "{:.1f}"), ("itl_ms_p99", "ITL p99", "{:.1f}"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="off,150,100,60,40", help="comma-separated --step-budget-ms values; off = none")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all budgets, order reversed every round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="measured requests per budget and round")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (and llama-server's -t/-tb)")
    p.add_argument("--port", type=int, default=8730)
    p.add_argument("--peer", action="store_true", help="also measure llama-server (needs benchmarks/llama_cpp_peer.py's build)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--chunks", action="store_true", help="time prompt chunks and decode steps on the engine instead")
    p.add_argument("--engine", type=Path, default=DEFAULT_ENGINE,
                   help="the engine directory to serve / time (default: the cached default-model int8 gqa engine)")
    p.add_argument("--repeats", type=int, default=5, help="with --chunks: timings per size")
    p.add_argument("--simulate", type=Path, metavar="CHUNKS_JSON",
                   help="simulate the HTTP run's closed loop on the scheduler with the cost a --chunks run measured")
    p.add_argument("--waiting-served-ratio", type=float, default=None,
                   help="toolkit serve --waiting-served-ratio for our server and the simulation (default: the scheduler's; 0: off)")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "itl_budget")
    return p.parse_args(argv)


def budget_values(text: str) -> list[str]:
    """``off,150,...`` as labels; each must be ``off`` or a non-negative number."""
    labels = [item.strip() for item in text.split(",") if item.strip()]
    for label in labels:
        if label != "off" and float(label) < 0:
            raise SystemExit(f"--budgets: {label} is negative")
    return labels


def round_order(labels: list[str], index: int) -> list[str]:
    """Round ``index``'s order: as given on even rounds, reversed on odd ones."""
    return list(labels) if index % 2 == 0 else list(reversed(labels))


# ---- HTTP: one server per budget ---------------------------------------------------------------------
def start(label: str, args: argparse.Namespace, logs: Path) -> Server:
    url = f"http://127.0.0.1:{args.port}"
    if label == PEER:
        layout = llama_build.Layout(llama_build.cache_root())
        gguf = layout.q8_gguf(llama_build.default_gguf().stem)
        command = llama_server_command(layout.tool("llama-server"), gguf, args.port, peer_plan(args.concurrency), args.threads)
        return Server(PEER, command, url, logs / "llama-server.log")
    budget = ["--step-budget-ms", "0" if label == "off" else label]
    if args.waiting_served_ratio is not None:
        budget += ["--waiting-served-ratio", str(args.waiting_served_ratio)]
    return Server(f"toolkit budget {label}", ours_command(args.port) + budget + [str(args.engine)], url,
                  logs / f"toolkit-{label}.log", env=ours_env(args.threads))


def peer_ready() -> bool:
    layout = llama_build.Layout(llama_build.cache_root())
    gguf = layout.q8_gguf(llama_build.default_gguf().stem)
    return layout.tool("llama-server").is_file() and gguf.is_file()


def measure(label: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    server = start(label, args, logs)
    try:
        server.wait_ready(args.ready_timeout)
        load_before = os.getloadavg()[0]
        result = asyncio.run(run_http_bench(server.url, server.model(), [args.concurrency], requests_per_level=args.requests,
                                            prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                                            ignore_eos=True, progress=False))[0]
    finally:
        server.stop()
    keep = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_s_p50", "errors",
            "requests", "output_tokens", "wall_s")
    return {"budget": label, **{k: result[k] for k in keep}, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0]}


def row_text(row: dict[str, Any]) -> str:
    cells = " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS)
    load = f"{row['loadavg_before']:.1f}->{row['loadavg_after']:.1f}" if "loadavg_before" in row else "-"
    return f"| {row['budget']} | {cells} | {row.get('errors', 0)} | {load} |"


def table(rows: list[dict[str, Any]], title: str) -> str:
    head = "| budget ms | " + " | ".join(name for _, name, _ in COLUMNS) + " | errors | load avg |"
    return "\n".join([title, head, "|" + "---|" * (len(COLUMNS) + 3), *(row_text(r) for r in rows)])


def medians(runs: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per budget, the median of each column over the rounds."""
    out = []
    for label in labels:
        mine = [r for r in runs if r["budget"] == label]
        out.append({"budget": label, **{key: statistics.median(r[key] for r in mine) for key, _, _ in COLUMNS},
                    "errors": sum(r["errors"] for r in mine),
                    "loadavg_before": statistics.median(r["loadavg_before"] for r in mine),
                    "loadavg_after": statistics.median(r["loadavg_after"] for r in mine)})
    return out


def http_main(args: argparse.Namespace, cpu: str) -> dict[str, Any]:
    labels = budget_values(args.budgets)
    if args.peer:
        if peer_ready():
            labels.append(PEER)
        else:
            print("--peer: llama-server or its Q8_0 GGUF is not built yet; run benchmarks/llama_cpp_peer.py once", flush=True)
    logs = args.out / "logs"
    runs: list[dict[str, Any]] = []
    for index in range(args.rounds):
        for label in round_order(labels, index):
            print(f"round {index + 1}: budget {label}", flush=True)
            runs.append({"round": index + 1, **measure(label, args, logs)})
            print(row_text(runs[-1]), flush=True)
    shape = (f"{args.concurrency} concurrent, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens "
             f"(ignore_eos), {args.requests} requests per run, {args.threads} threads")
    for index in range(args.rounds):
        print(table([r for r in runs if r["round"] == index + 1], f"\nround {index + 1} ({shape})"))
    print(table(medians(runs, labels), f"\nmedian over {args.rounds} rounds; {cpu}"))
    return {"shape": shape, "runs": runs, "medians": medians(runs, labels)}


# ---- --chunks: the engine's runner alone ------------------------------------------------------------
def chunks_main(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of prompt chunks by size and past, and of decode steps by rows (sizes interleaved)."""
    import numpy as np

    from toolkit.runtime.gqa_runner import GqaModelRunner

    runner = GqaModelRunner(args.engine / "model.onnx", args.threads)
    rng = np.random.default_rng(0)
    ids = lambda n: [int(t) for t in rng.integers(100, 5000, n)]  # noqa: E731
    sizes, pasts, rows_list = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512], [0, 256], [1, 2, 4, 8, 12, 16]
    _, cached = runner.prefill(ids(256), None, 0)
    prefill = {(n, past): [] for n in sizes for past in pasts}
    decode = {rows: [] for rows in rows_list}
    for _ in range(args.repeats):
        for n in sizes:
            for past in pasts:
                buffers = None if past == 0 else {k: v.copy() for k, v in cached.items()}
                started = time.perf_counter()
                runner.prefill(ids(n), buffers, past)
                prefill[(n, past)].append(time.perf_counter() - started)
        for rows in rows_list:
            batch = runner.new_batch()
            batch.add_rows(cached, [236] * rows)  # the bench's mid-stream length: 108 prompt + 128 generated
            started = time.perf_counter()
            runner.decode(batch, [100] * rows, [236] * rows)
            decode[rows].append(time.perf_counter() - started)
    rows_out = [{"tokens": n, "past": past, "ms": 1000 * statistics.median(t), "ms_per_token": 1000 * statistics.median(t) / n}
                for (n, past), t in prefill.items()]
    decode_out = [{"rows": rows, "ms": 1000 * statistics.median(t)} for rows, t in decode.items()]
    print(f"prompt chunks ({args.repeats} runs each, median):\n| tokens | past | ms | ms/token |\n|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['tokens']} | {r['past']} | {r['ms']:.1f} | {r['ms_per_token']:.2f} |")
    print("decode steps at 236 cached tokens per row:\n| rows | ms |\n|---|---|")
    for r in decode_out:
        print(f"| {r['rows']} | {r['ms']:.1f} |")
    return {"prefill": rows_out, "decode": decode_out}


# ---- --simulate: the scheduler against a measured cost, no noise ------------------------------------
class _Group:
    """What the scheduler reads of a request: prompt, prefill progress, one sequence, its reservation."""

    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, now: float):
        self.request_id, self.prompt_ids, self.prefilled, self.submitted = f"r{index}", (0,) * prompt_tokens, 0, now
        self.reserved_tokens, self.prefix = prompt_tokens + max_tokens, None
        self.sequences = [SimpleNamespace(seq_id=self.request_id, group=self, output_ids=[], times=[])]

    @property
    def prefill_remaining(self) -> int:
        return len(self.prompt_ids) - self.prefilled


def simulate(cost, budget_ms: float | None, args: argparse.Namespace, requests: int, step_overhead_s: float = 0.002,
             waiting_served_ratio: float | None = None) -> dict:
    """The closed loop of the HTTP run (``concurrency`` clients, each resubmitting at once) on the real
    ``Scheduler``, time advanced by ``cost``'s predictions (+ ``step_overhead_s`` of sampling per step).

    ``waiting_served_ratio``: the scheduler's option (None: its default; 0: no prompts-only steps).
    """
    from toolkit.runtime.kv_cache import KVCacheManager, KvGeometry
    from toolkit.runtime.scheduler import Scheduler, SchedulerConfig

    config = SchedulerConfig(max_batch_size=args.concurrency, prefix_cache=False, step_budget_ms=budget_ms,
                             **({} if waiting_served_ratio is None else {"waiting_served_ratio": waiting_served_ratio}))
    scheduler = Scheduler(config, KVCacheManager(KvGeometry(1, 1, 1, "float32"), 1 << 30))
    now, issued, done = 0.0, 0, []

    def submit() -> None:
        nonlocal issued
        scheduler.waiting.append(_Group(issued, args.prompt_tokens, args.max_tokens, now))
        issued += 1

    for _ in range(args.concurrency):
        submit()
    while len(done) < requests:
        plan = scheduler.schedule()
        prefill_s = sum(cost.chunk_seconds(stop - start, start) for _, start, stop in plan.prefill)
        decode_s = cost.decode_seconds(plan.rows, plan.context if plan.rows else 0)
        scheduler.observe_step(plan, prefill_s, decode_s)
        now += prefill_s + decode_s + step_overhead_s
        for seq in scheduler.running if plan.decode else ():
            seq.output_ids.append(0)
            seq.times.append(now)
        for group, _, stop in plan.prefill:
            group.prefilled = stop
            if not group.prefill_remaining:
                seq = group.sequences[0]
                seq.output_ids.append(0)
                seq.times.append(now)
                scheduler.running.append(seq)
                scheduler.prefilling.remove(group)
        for seq in [s for s in scheduler.running if len(s.output_ids) >= args.max_tokens]:
            scheduler.running.remove(seq)
            scheduler.release(seq)
            done.append(seq)
            submit()
    from toolkit.bench.offline import summarize

    measured = done[:requests]
    return asdict(summarize(args.concurrency, max(s.times[-1] for s in measured),
                            [s.group.submitted for s in measured], [s.times for s in measured]))


def simulate_main(args: argparse.Namespace) -> dict[str, Any]:
    """The trade-off curve on the cost the ``--chunks`` JSON measured (fitted as the engine would)."""
    from toolkit.runtime.step_cost import StepCostModel

    measured = json.loads(args.simulate.read_text())
    cost = StepCostModel(forget=1.0)
    for _ in range(3):
        for row in measured["prefill"]:
            cost.observe_prefill([(row["tokens"], row["past"])], row["ms"] / 1000)
        for row in measured["decode"]:
            cost.observe_decode(row["rows"], 236, row["ms"] / 1000)
    rows = []
    for label in budget_values(args.budgets):
        result = simulate(cost, None if label == "off" else float(label), args, args.requests,
                          waiting_served_ratio=args.waiting_served_ratio)
        rows.append({"budget": label, **result, "errors": 0})
    print(table(rows, f"\nsimulated on the cost measured in {args.simulate} ({measured.get('cpu', '?')}), "
                      f"{args.requests} requests"))
    return {"simulated_from": str(args.simulate), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpu = f"CPU: {read_cpu().summary()}"
    print(cpu, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%dT%H%M%S")
    kind = "chunks" if args.chunks else "simulated" if args.simulate else "http"
    result = {"chunks": chunks_main, "simulated": simulate_main, "http": lambda a: http_main(a, cpu)}[kind](args)
    path = args.out / f"{kind}-{started}.json"
    path.write_text(json.dumps({"cpu": cpu, "args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
