"""Soak a server under mixed load for D seconds and record its memory: the 10-minute memory curve.

    python benchmarks/soak.py --serve [ENGINE_DIR] [--serve-arg=--kv-cache-gib=2] --out soak-results
    python benchmarks/soak.py http://127.0.0.1:8000 --pid $(pgrep -f "toolkit serve") [--clients 12] [--duration 600]

``--serve`` starts ``toolkit serve`` itself (the default model when no ENGINE_DIR; extra serve
options with ``--serve-arg``), waits until it answers, and stops it afterwards. Every client sends
streaming requests back to back (random prompt and output lengths), odd clients over the Workers AI
schema and even ones over OpenAI's; the clients with index divisible by 3 drop each connection at a
random point (after a random number of chunks, or at a random time, possibly before the first
token); every ``--malformed-every``-th request of a client is malformed (bad JSON, wrong types,
unknown model: each must get a 4xx) and every ``--json-every``-th asks for a JSON schema
(``response_format``). Every ``--sample-s`` seconds it records the server's RSS (``/proc``) and
its memory gauges (``/metrics``: KV bytes allocated and budget, prefix cache, glibc's free heap).
Afterwards, with ``--settle`` seconds for aborts to land, it scrapes ``/metrics`` and checks:

* zero 5xx responses, zero error events in streams and zero transport failures;
* zero running requests and zero KV cache in use (gauges summed over their labels);
* flat: the per-minute median RSS after warm-up grew at most ``--max-rss-growth`` percent over the
  first whole minute after it (issue #13's bar), and so did the peak over the RSS at the end of
  warm-up (stricter: one sample each);
* peak RSS <= model weights + KV budget + ``--overhead-mib`` (from the server's gauges).

Writes ``soak.json`` (numbers and samples) and ``soak.png`` (RSS and KV bytes over time) under
``--out``, prints the numbers and a verdict; exits 1 when a check fails (2 when the server cannot
be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from toolkit.bench.loadgen import LoadSpec, endpoint, prompt_text, request_body, stream_request

MEMORY_METRICS = ("process_resident_memory_bytes", "toolkit_kv_cache_allocated_bytes", "toolkit_kv_cache_budget_bytes",
                  "toolkit_model_weights_bytes", "toolkit_malloc_free_bytes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", nargs="?", default=None, help="server base URL, e.g. http://127.0.0.1:8000 (not with --serve)")
    p.add_argument("--serve", nargs="?", const="", default=None, metavar="ENGINE_DIR",
                   help="start `toolkit serve [ENGINE_DIR]` on a free port for the run (the default model without ENGINE_DIR)")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `toolkit serve` option, e.g. --serve-arg=--kv-cache-gib=2")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (warm-up included)")
    p.add_argument("--warmup", type=float, default=180.0, help="seconds before the RSS baseline is taken")
    p.add_argument("--sample-s", type=float, default=3.0, help="seconds between memory samples")
    p.add_argument("--malformed-every", type=int, default=7, help="every Nth request of a client is malformed (0: none)")
    p.add_argument("--json-every", type=int, default=5, help="every Nth request of a client asks for a JSON schema (0: none)")
    p.add_argument("--overhead-mib", type=float, default=512.0,
                   help="stated overhead: peak RSS must stay <= weights + KV budget + this")
    p.add_argument("--out", type=Path, default=None, help="write soak.json and soak.png here")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the load before scraping")
    p.add_argument("--pid", type=int, default=None, help="server process id, for resident memory")
    p.add_argument("--schema", choices=("both", "openai", "workers-ai"), default="both")
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


JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
               "required": ["name", "count"]}


def json_body(spec: LoadSpec, body: dict) -> dict:
    """``body`` asking for ``JSON_SCHEMA`` (OpenAI only: Workers AI refuses JSON mode on a stream, by design)."""
    if spec.schema == "workers-ai":
        return body
    return {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": JSON_SCHEMA}}}


def malformed_body(spec: LoadSpec, rng: random.Random) -> bytes:
    """A request the server must refuse with a 4xx: broken JSON, wrong types, out-of-range values, unknown model."""
    good = request_body(spec, prompt_text(8), 8)
    broken = [b'{"prompt": "unterminated', json.dumps({**good, "max_tokens": "many"}).encode(),
              json.dumps({**good, "max_tokens": -5}).encode(), json.dumps({**good, "temperature": [1]}).encode(),
              json.dumps({**good, "prompt": None}).encode(), b"[]"]
    if spec.schema == "openai":
        broken.append(json.dumps({**good, "model": "no-such-model"}).encode())
    return rng.choice(broken)


class Soak:
    """The clients' shared state: what they saw, and when to stop."""

    def __init__(self, args: argparse.Namespace, specs: list[LoadSpec]) -> None:
        self.args, self.specs = args, specs
        self.deadline = time.monotonic() + args.duration
        self.statuses: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.error_samples: list[str] = []

    async def client(self, client: httpx.AsyncClient, index: int) -> None:
        """Send requests until the deadline; every third client disconnects at random points."""
        rng = random.Random(f"{self.args.seed}-{index}")
        spec = self.specs[index % len(self.specs)]
        lo_p, hi_p = (int(x) for x in self.args.prompt_tokens.split(","))
        lo_m, hi_m = (int(x) for x in self.args.max_tokens.split(","))
        sent = 0
        while time.monotonic() < self.deadline:
            sent += 1
            if self.args.malformed_every and sent % self.args.malformed_every == 0:
                await self._malformed(client, spec, rng)
                continue
            max_tokens = rng.randint(lo_m, hi_m)
            body = request_body(spec, prompt_text(rng.randint(lo_p, hi_p), rng.randrange(10**9)), max_tokens)
            if self.args.json_every and sent % self.args.json_every == 0:
                body = json_body(spec, body)
            if index % 3 != 0:
                self._record(await stream_request(client, spec, body), False)
            elif rng.random() < 0.5:
                after = rng.randint(1, max(1, max_tokens - 1))
                self._record(await stream_request(client, spec, body, disconnect_after=after), True)
            else:
                try:
                    record = await asyncio.wait_for(stream_request(client, spec, body), rng.uniform(0.05, 3.0))
                    self._record(record, False)
                except asyncio.TimeoutError:
                    self.outcomes["disconnected"] += 1

    async def _malformed(self, client: httpx.AsyncClient, spec: LoadSpec, rng: random.Random) -> None:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {})}
        try:
            response = await client.post(endpoint(spec), content=malformed_body(spec, rng), headers=headers)
        except httpx.HTTPError as exc:
            self.outcomes["stream_or_transport_error"] += 1
            self.error_samples.append(f"malformed request: {type(exc).__name__}: {exc}")
            return
        self.statuses[response.status_code] += 1
        kind = "malformed_4xx" if 400 <= response.status_code < 500 else (
            "http_5xx" if response.status_code >= 500 else "malformed_accepted")
        self.outcomes[kind] += 1
        if kind != "malformed_4xx" and len(self.error_samples) < 5:
            self.error_samples.append(f"malformed request got HTTP {response.status_code}: {response.text[:200]}")

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


async def scrape_memory(client: httpx.AsyncClient, url: str, api_key: str | None) -> dict[str, float]:
    """The memory gauges, summed over models; KV bytes also by part (``kv_decode`` ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(f"{url.rstrip('/')}/metrics", headers=headers)
    response.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in MEMORY_METRICS:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
                if "part" in sample.labels:
                    out[sample.labels["part"]] = out.get(sample.labels["part"], 0.0) + sample.value
    return out


async def _watch(soak: Soak, client: httpx.AsyncClient, pid: int | None, rss: dict[str, int | None],
                 samples: list[dict]) -> None:
    """Progress line every second; a memory sample every ``--sample-s``; the RSS baseline at the end of warm-up."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    next_sample = started
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("soak", total=soak.args.duration)
        while (now := time.monotonic()) < soak.deadline:
            if rss["after_warmup"] is None and now - started >= soak.args.warmup:
                rss["after_warmup"] = rss_bytes(pid)
            if now >= next_sample:
                next_sample += soak.args.sample_s
                sample = {"t": round(now - started, 2), "rss": rss_bytes(pid)}
                try:
                    sample.update(await scrape_memory(client, soak.args.url, soak.args.api_key))
                except httpx.HTTPError:
                    pass  # a scrape that times out under load: RSS alone
                samples.append(sample)
            bar.update(task, completed=now - started, description=" ".join(f"{k} {v}" for k, v in sorted(soak.outcomes.items())))
            await asyncio.sleep(min(1.0, max(0.05, next_sample - time.monotonic())))


async def run(args: argparse.Namespace) -> dict:
    """Run the soak; the numbers as a dict."""
    names = [args.running_metric, args.kv_metric, args.waiting_metric]
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        model = args.model or (await client.get(f"{args.url.rstrip('/')}/v1/models")).json()["data"][0]["id"]
        schemas = ("openai", "workers-ai") if args.schema == "both" else (args.schema,)
        specs = [LoadSpec(args.url, model, schema, api_key=args.api_key, include_usage=True, seed=args.seed)
                 for schema in schemas]
        metrics_before = await scrape(client, args.url, names, args.api_key)
        rss = {"start": rss_bytes(args.pid), "after_warmup": None, "end": None}
        samples: list[dict] = []
        soak = Soak(args, specs)
        await asyncio.gather(_watch(soak, client, args.pid, rss, samples), *(soak.client(client, i) for i in range(args.clients)))
        await asyncio.sleep(args.settle)
        metrics_after = await scrape(client, args.url, names, args.api_key)
        memory_after = await scrape_memory(client, args.url, args.api_key)
        rss["end"] = rss_bytes(args.pid)
    return {"url": args.url, "model": model, "clients": args.clients, "duration_s": args.duration,
            "warmup_s": args.warmup, "cpu": cpu_name(), "machine": platform.platform(),
            "outcomes": dict(soak.outcomes), "status_counts": {str(k): v for k, v in soak.statuses.items()},
            "error_samples": soak.error_samples, "metrics_before": metrics_before, "metrics_after": metrics_after,
            "memory_after": memory_after, "rss_bytes": rss, "samples": samples}


def cpu_name() -> str:
    """The CPU model and the vector flags that matter here (from /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in fields.get("flags", "").split()]
    return f"{fields.get('model name', '?')} ({os.cpu_count()} CPUs; {' '.join(flags)})"


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
    checks.append(("malformed requests refused with 4xx", out.get("malformed_accepted", 0) == 0,
                   f"{out.get('malformed_4xx', 0)} refused, {out.get('malformed_accepted', 0)} accepted"))
    checks.extend(memory_checks(numbers, args))
    return checks


def memory_checks(numbers: dict, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """Flat after warm-up (peak vs the warm-up baseline) and peak RSS within weights + KV budget + overhead."""
    rss = numbers["rss_bytes"]
    after = [s["rss"] for s in numbers["samples"] if s["t"] >= args.warmup and s.get("rss")]
    if not (rss["after_warmup"] and after):
        return [("RSS growth after warm-up", args.pid is None, "no server pid: not checked"
                 if args.pid is None else "could not read RSS (warm-up longer than the run?)")]
    base, peak = rss["after_warmup"], max(after)
    growth = 100.0 * (peak - base) / base
    numbers["rss_growth_pct"] = growth
    numbers["rss_end_growth_pct"] = 100.0 * ((rss["end"] or base) - base) / base
    # the same without the prefix cache, which grows by design until it holds its share of the KV budget
    no_prefix = [(s["t"], s["rss"] - s.get("prefix_cache", 0)) for s in numbers["samples"] if s.get("rss")]
    start = next((v for t, v in no_prefix if t >= args.warmup), None)
    if start:
        numbers["rss_minus_prefix_cache_growth_pct"] = 100.0 * (max(v for t, v in no_prefix if t >= args.warmup) - start) / start
    checks = [(f"RSS growth <= {args.max_rss_growth:g}% after warm-up (peak)", growth <= args.max_rss_growth,
               f"{base / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB ({growth:+.2f}%), "
               f"end {(rss['end'] or 0) / 2**20:.1f} MiB")]
    numbers["per_minute"] = per_minute(numbers["samples"])
    median_growth = minute_median_growth(numbers["per_minute"], args.warmup)
    if median_growth is not None:
        numbers["rss_minute_median_growth_pct"] = median_growth
        checks.insert(0, (f"per-minute median RSS growth <= {args.max_rss_growth:g}% after warm-up",
                          median_growth <= args.max_rss_growth, f"{median_growth:+.2f}% (the highest minute over the first)"))
    memory = numbers["memory_after"]
    weights, budget = memory.get("toolkit_model_weights_bytes"), memory.get("toolkit_kv_cache_budget_bytes")
    if weights is None or budget is None:
        return [*checks, ("peak RSS within weights + KV budget + overhead", False, "the server exports no memory gauges")]
    peak_all = max(s["rss"] for s in numbers["samples"] if s.get("rss"))
    bound = weights + budget + args.overhead_mib * 2**20
    numbers["rss_bound_bytes"], numbers["rss_peak_bytes"] = bound, peak_all
    non_kv = [s["rss"] - s.get("toolkit_kv_cache_allocated_bytes", 0) for s in numbers["samples"] if s.get("rss")]
    numbers["rss_minus_kv_peak_bytes"] = max(non_kv)
    checks.append((f"peak RSS <= weights + KV budget + {args.overhead_mib:g} MiB", peak_all <= bound,
                   f"{peak_all / 2**20:.0f} MiB <= {weights / 2**20:.0f} + {budget / 2**20:.0f} + {args.overhead_mib:g} "
                   f"= {bound / 2**20:.0f} MiB (RSS minus KV allocated: peak {max(non_kv) / 2**20:.0f} MiB)"))
    return checks


def per_minute(samples: list[dict]) -> list[dict]:
    """Per minute of the run: median and peak RSS, median RSS minus KV allocated, prefix cache bytes at its end.

    Medians show the level under the transients (a reallocation or a prompt's working memory
    lasts until the next ``malloc_trim``); RSS minus KV shows what is not the KV cache.
    """
    import statistics

    rows = []
    end = max((s["t"] for s in samples), default=0)
    for start in range(0, int(end) + 1, 60):
        window = [s for s in samples if start <= s["t"] < start + 60 and s.get("rss")]
        if window:
            rows.append({"minute": start // 60, "rss_median": statistics.median(s["rss"] for s in window),
                         "rss_peak": max(s["rss"] for s in window),
                         "rss_minus_kv_median": statistics.median(s["rss"] - s.get("toolkit_kv_cache_allocated_bytes", 0)
                                                                  for s in window),
                         "prefix_cache": window[-1].get("prefix_cache", 0), "whole": start + 60 <= end + 3})
    return rows


def minute_median_growth(rows: list[dict], warmup: float) -> float | None:
    """Percent by which the highest per-minute median RSS after warm-up exceeds the first whole minute's after it.

    Medians, not single samples: a reallocation or a prompt's working memory lasts until the next
    ``malloc_trim`` (seconds), which is noise to a level that should be flat; the last minute is
    left out when the run ended inside it (fewer samples).
    """
    after = [row for row in rows if row["minute"] * 60 >= warmup and row.get("whole", True)]
    if len(after) < 2:
        return None
    return 100.0 * (max(row["rss_median"] for row in after) - after[0]["rss_median"]) / after[0]["rss_median"]


def plot_memory(path: Path, numbers: dict, warmup: float) -> None:
    """RSS, RSS minus KV, and KV bytes by part over time; the warm-up end marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in numbers["samples"] if s.get("rss")]
    t = [s["t"] for s in samples]
    mib = lambda key: [s.get(key, 0) / 2**20 for s in samples]  # noqa: E731
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(t, mib("rss"), label="server RSS", linewidth=2)
    ax.plot(t, [r - k for r, k in zip(mib("rss"), mib("toolkit_kv_cache_allocated_bytes"))], label="RSS minus KV allocated")
    for part, label in (("kv_decode", "KV: decode batch"), ("kv_prefill", "KV: prefill"), ("prefix_cache", "KV: prefix cache"),
                        ("toolkit_malloc_free_bytes", "glibc free heap")):
        if any(s.get(part) for s in samples):
            ax.plot(t, mib(part), label=label, linewidth=1)
    if numbers.get("rss_bound_bytes"):
        ax.axhline(numbers["rss_bound_bytes"] / 2**20, color="red", linestyle=":", label="weights + KV budget + overhead")
    ax.axvline(warmup, color="grey", linestyle="--", label="end of warm-up")
    growth = numbers.get("rss_growth_pct")
    ax.set_title(f"{numbers['clients']} clients, mixed load, {numbers['duration_s']:.0f} s"
                 + (f": peak RSS growth after warm-up {growth:+.1f}%" if growth is not None else "") + f"\n{numbers['cpu']}",
                 fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    """``toolkit serve`` on a free port; sets ``args.url`` and ``args.pid``; waits until /health says the engines are ready."""
    port = free_port()
    toolkit = Path(sys.executable).with_name("toolkit")
    command = [str(toolkit) if toolkit.exists() else "toolkit", "serve", *([args.serve] if args.serve else []),
               "--port", str(port), "--log-level", "warning", *args.serve_arg]
    print("starting:", " ".join(command), file=sys.stderr)
    server = subprocess.Popen(command)
    args.url, args.pid = f"http://127.0.0.1:{port}", server.pid
    deadline = time.monotonic() + 1800  # the first run may export the default model
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"toolkit serve exited with {server.returncode}")
        try:
            if httpx.get(f"{args.url}/health", timeout=5).status_code == 200:  # 503 until the engines are loaded
                return server
        except httpx.HTTPError:
            pass
        time.sleep(2)
    server.terminate()
    raise SystemExit("toolkit serve did not answer in 30 minutes")


def main(argv: list[str] | None = None) -> None:
    """Run the soak, print the numbers and the verdict, exit 1 on a failed check."""
    args = parse_args(argv)
    if (args.url is None) == (args.serve is None):
        raise SystemExit("give either a server URL or --serve [ENGINE_DIR]")
    server = start_server(args) if args.serve is not None else None
    try:
        numbers = asyncio.run(run(args))
    except httpx.HTTPError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    checks = verdict(numbers, args)
    numbers["checks"] = [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]
    print(json.dumps({k: numbers[k] for k in ("outcomes", "status_counts", "metrics_after", "rss_bytes")}, indent=2))
    for check, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {check}: {detail}")
    if numbers["error_samples"]:
        print("error samples:", *numbers["error_samples"], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(numbers, indent=2) + "\n")
        plot_memory(args.out / "soak.png", numbers, args.warmup)
        print(f"saved {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    for row in numbers.get("per_minute", []):
        print(f"minute {row['minute']:>2}: RSS median {row['rss_median'] / 2**20:7.1f} MiB, peak {row['rss_peak'] / 2**20:7.1f}, "
              f"minus KV {row['rss_minus_kv_median'] / 2**20:7.1f}, prefix cache {row['prefix_cache'] / 2**20:6.1f}")
    if numbers.get("rss_growth_pct") is not None:
        print(f"RSS after warm-up ({args.warmup:g} s): per-minute median "
              f"{numbers.get('rss_minute_median_growth_pct', float('nan')):+.2f}%, peak {numbers['rss_growth_pct']:+.2f}%, "
              f"end {numbers['rss_end_growth_pct']:+.2f}%, peak without the prefix cache "
              f"{numbers.get('rss_minus_prefix_cache_growth_pct', float('nan')):+.2f}%  [{numbers['cpu']}]")
    passed = all(ok for _, ok, _ in checks)
    print("VERDICT:", "PASS" if passed else "FAIL")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
