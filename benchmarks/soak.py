"""Soak a running server: N concurrent streaming clients for D seconds, a third disconnecting early.

    python benchmarks/soak.py http://127.0.0.1:8000 --pid $(pgrep -f "toolkit serve") [--clients 32] [--duration 600]

Every client sends streaming requests back to back (random prompt and output lengths); the
clients with index divisible by 3 drop each connection at a random point (after a random number
of chunks, or at a random time, possibly before the first token). Afterwards, with ``--settle``
seconds for aborts to land, it scrapes ``/metrics`` and checks:

* zero 5xx responses, zero error events in streams and zero transport failures;
* zero running requests and zero KV cache in use (gauges summed over their labels);
* server RSS (``--pid``) grew less than ``--max-rss-growth`` percent from the end of warm-up.

Prints the numbers and a verdict; exits 1 when a check fails (2 when the server cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from toolkit.bench.loadgen import LoadSpec, prompt_text, request_body, stream_request


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (warm-up included)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the load before scraping")
    p.add_argument("--pid", type=int, default=None, help="server process id, for resident memory")
    p.add_argument("--schema", choices=("openai", "workers-ai"), default="openai")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt-tokens", default="16,256", help="uniform range LOW,HIGH")
    p.add_argument("--max-tokens", default="8,128", help="uniform range LOW,HIGH")
    p.add_argument("--running-metric", default="toolkit_running_requests")
    p.add_argument("--kv-metric", default="toolkit_kv_cache_used_tokens")
    p.add_argument("--waiting-metric", default="toolkit_queue_depth")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of ``pid`` from /proc (None without a pid)."""
    if pid is None:
        return None
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # the process is gone
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


async def scrape(client: httpx.AsyncClient, url: str, names: list[str], api_key: str | None) -> dict[str, float | None]:
    """Each named metric summed over its label sets (None when the server does not export it)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(f"{url.rstrip('/')}/metrics", headers=headers)
    response.raise_for_status()
    totals: dict[str, float | None] = dict.fromkeys(names)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] = (totals[sample.name] or 0.0) + sample.value
    return totals


class Soak:
    """The clients' shared state: what they saw, and when to stop."""

    def __init__(self, args: argparse.Namespace, spec: LoadSpec) -> None:
        self.args, self.spec = args, spec
        self.deadline = time.monotonic() + args.duration
        self.statuses: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.error_samples: list[str] = []

    async def client(self, client: httpx.AsyncClient, index: int) -> None:
        """Send requests until the deadline; every third client disconnects at random points."""
        rng = random.Random(f"{self.args.seed}-{index}")
        lo_p, hi_p = (int(x) for x in self.args.prompt_tokens.split(","))
        lo_m, hi_m = (int(x) for x in self.args.max_tokens.split(","))
        while time.monotonic() < self.deadline:
            max_tokens = rng.randint(lo_m, hi_m)
            body = request_body(self.spec, prompt_text(rng.randint(lo_p, hi_p), rng.randrange(10**9)), max_tokens)
            if index % 3 != 0:
                self._record(await stream_request(client, self.spec, body), False)
            elif rng.random() < 0.5:
                after = rng.randint(1, max(1, max_tokens - 1))
                self._record(await stream_request(client, self.spec, body, disconnect_after=after), True)
            else:
                try:
                    record = await asyncio.wait_for(stream_request(client, self.spec, body), rng.uniform(0.05, 3.0))
                    self._record(record, False)
                except asyncio.TimeoutError:
                    self.outcomes["disconnected"] += 1

    def _record(self, record, disconnect: bool) -> None:
        self.statuses[record.status] += 1
        if record.error is None:
            self.outcomes["disconnected" if disconnect else "completed"] += 1
            return
        kind = "http_5xx" if record.status and record.status >= 500 else (
            "http_other" if record.status and record.status >= 300 else "stream_or_transport_error")
        self.outcomes[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(record.error)


async def _watch(soak: Soak, pid: int | None, rss: dict[str, int | None]) -> None:
    """Progress line every second; the RSS baseline at the end of warm-up."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("soak", total=soak.args.duration)
        while (now := time.monotonic()) < soak.deadline:
            if rss["after_warmup"] is None and now - started >= soak.args.warmup:
                rss["after_warmup"] = rss_bytes(pid)
            bar.update(task, completed=now - started, description=" ".join(f"{k} {v}" for k, v in sorted(soak.outcomes.items())))
            await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> dict:
    """Run the soak; the numbers as a dict."""
    names = [args.running_metric, args.kv_metric, args.waiting_metric]
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        model = args.model or (await client.get(f"{args.url.rstrip('/')}/v1/models")).json()["data"][0]["id"]
        spec = LoadSpec(args.url, model, args.schema, api_key=args.api_key, include_usage=True, seed=args.seed)
        metrics_before = await scrape(client, args.url, names, args.api_key)
        rss = {"start": rss_bytes(args.pid), "after_warmup": None, "end": None}
        soak = Soak(args, spec)
        await asyncio.gather(_watch(soak, args.pid, rss), *(soak.client(client, i) for i in range(args.clients)))
        await asyncio.sleep(args.settle)
        metrics_after = await scrape(client, args.url, names, args.api_key)
        rss["end"] = rss_bytes(args.pid)
    return {"url": args.url, "model": model, "clients": args.clients, "duration_s": args.duration,
            "outcomes": dict(soak.outcomes), "status_counts": {str(k): v for k, v in soak.statuses.items()},
            "error_samples": soak.error_samples, "metrics_before": metrics_before, "metrics_after": metrics_after,
            "rss_bytes": rss}


def verdict(numbers: dict, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for every soak criterion."""
    out, after = numbers["outcomes"], numbers["metrics_after"]
    server_errors = out.get("http_5xx", 0)
    stream_errors = out.get("stream_or_transport_error", 0)
    checks = [("zero 5xx", server_errors == 0, f"{server_errors} responses with status >= 500"),
              ("zero stream/transport errors", stream_errors == 0, f"{stream_errors}")]
    for name in (args.running_metric, args.kv_metric):
        value = after.get(name)
        checks.append((f"{name} == 0 after the load", value == 0, "not exported" if value is None else f"{value:g}"))
    rss = numbers["rss_bytes"]
    if rss["after_warmup"] and rss["end"]:
        growth = 100.0 * (rss["end"] - rss["after_warmup"]) / rss["after_warmup"]
        numbers["rss_growth_pct"] = growth
        checks.append((f"RSS growth < {args.max_rss_growth:g}% after warm-up", growth < args.max_rss_growth,
                       f"{rss['after_warmup'] / 2**20:.1f} MiB -> {rss['end'] / 2**20:.1f} MiB ({growth:+.2f}%)"))
    else:
        checks.append(("RSS growth after warm-up", args.pid is None, "no --pid given: not checked"
                       if args.pid is None else "could not read RSS (warm-up longer than the run?)"))
    return checks


def main(argv: list[str] | None = None) -> None:
    """Run the soak, print the numbers and the verdict, exit 1 on a failed check."""
    args = parse_args(argv)
    try:
        numbers = asyncio.run(run(args))
    except httpx.HTTPError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        sys.exit(2)
    checks = verdict(numbers, args)
    numbers["checks"] = [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]
    print(json.dumps({k: numbers[k] for k in ("outcomes", "status_counts", "metrics_after", "rss_bytes")}, indent=2))
    for check, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {check}: {detail}")
    if numbers["error_samples"]:
        print("error samples:", *numbers["error_samples"], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    passed = all(ok for _, ok, _ in checks)
    print("VERDICT:", "PASS" if passed else "FAIL")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
