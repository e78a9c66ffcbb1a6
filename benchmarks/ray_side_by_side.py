"""Plain ``toolkit serve`` vs the same engine through Ray Serve with 1 and 2 replicas, in one run.

Starts ``toolkit serve ENGINE`` (onnxruntime picks its threads) and a local Ray cluster with the
app deployed behind Ray Serve's proxy (``toolkit.scale.ray_serve.deploy``), then, per round and
concurrency level, benchmarks plain / Ray x1 (``--threads`` = all cores) / Ray x2 (cores split
between the replicas) with the ``toolkit bench`` load generator, alternating the order each round
(the Ray side is redeployed between 1 and 2 replicas when its turn comes). Prints one table with
aggregate output tokens/s and p50/p99 TTFT per side and level, and saves the raw results as JSON.

    python benchmarks/ray_side_by_side.py [ENGINE_DIR] [--levels 16,32] [--rounds 2] [--cores 2]

Default ENGINE_DIR: the default model's engine (exported on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from toolkit.bench.loadgen import run_http_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", nargs="?", type=Path)
    p.add_argument("--levels", default="16,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cores", type=int, default=2, help="CPU threads per side (Ray x2: split between replicas)")
    p.add_argument("--port-plain", type=int, default=8720)
    p.add_argument("--port-ray", type=int, default=8721)
    p.add_argument("--out", type=Path, default=Path("bench-results/ray_side_by_side.json"))
    return p.parse_args(argv)


def wait_ready(url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from ray import serve

    from toolkit.recipes import get_recipe
    from toolkit.artifact.manifest import load_manifest
    from toolkit.scale import ray_serve
    from toolkit.scale.options import ScaleOptions

    engine_dir = args.engine_dir
    if engine_dir is None:
        from toolkit.export.pipeline import ensure_default_engine

        from toolkit.export.progress import StageReporter

        engine_dir = ensure_default_engine(StageReporter(quiet=True))
    model = get_recipe(load_manifest(engine_dir, verify_hashes=False).recipe).name
    levels = [int(x) for x in args.levels.split(",")]
    plain_url, ray_url = f"http://127.0.0.1:{args.port_plain}", f"http://127.0.0.1:{args.port_ray}"
    plain = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", str(engine_dir), "--port", str(args.port_plain),
                              "--log-level", "warning"])
    ray_serve.init_ray(num_cpus=args.cores, logging_level="WARNING", log_to_driver=False)
    sides = {
        "plain": None,
        "ray x1": ScaleOptions(replicas=1, threads=args.cores),
        "ray x2": ScaleOptions(replicas=2, threads=max(1, args.cores // 2)),
    }
    deployed: list[str | None] = [None]

    def ensure(side: str) -> str:
        if sides[side] is None:
            return plain_url
        if deployed[0] != side:
            if deployed[0] is not None:  # a rolling update would need both versions' CPUs at once
                serve.delete(ray_serve.APP_NAME)
            ray_serve.deploy([engine_dir], [], sides[side], port=args.port_ray, log_level="warning")
            wait_ready(ray_url)
            deployed[0] = side
        return ray_url

    results: dict[str, dict[int, list[dict]]] = {s: {lv: [] for lv in levels} for s in sides}
    try:
        wait_ready(plain_url)
        order = list(sides)
        for rnd in range(args.rounds):
            # alternate: forward on even rounds, backward on odd ones; the Ray side keeps its deployment across the seam
            for side in (order if rnd % 2 == 0 else order[::-1]):
                url = ensure(side)
                for level in levels:
                    res = asyncio.run(run_http_bench(url, model, [level], requests_per_level=args.waves * level,
                                                     prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                                                     ignore_eos=True, progress=False, seed=rnd))[0]
                    results[side][level].append(res)
                    print(f"round {rnd + 1} {side:7s} c={level}: {res['output_tokens_per_s']:.1f} tok/s, "
                          f"TTFT p50 {res['ttft_ms_p50']:.0f} ms p99 {res['ttft_ms_p99']:.0f} ms, "
                          f"errors {res['errors']}", flush=True)
    finally:
        plain.terminate()
        plain.wait(60)
        serve.shutdown()
        import ray

        ray.shutdown()

    print(f"\nCPU: {cpu_model()}; {args.cores} cores per side; {args.rounds} rounds alternated; "
          f"prompt {args.prompt_tokens}, max_tokens {args.max_tokens} (ignore_eos)\n")
    print("| side | concurrency | output tok/s (mean of rounds) | TTFT p50 ms | TTFT p99 ms | errors | tok/s vs plain |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for level in levels:
        base = statistics.mean(r["output_tokens_per_s"] for r in results["plain"][level])
        for side in sides:
            rs = results[side][level]
            tps = statistics.mean(r["output_tokens_per_s"] for r in rs)
            p50 = statistics.mean(r["ttft_ms_p50"] for r in rs)
            p99 = statistics.mean(r["ttft_ms_p99"] for r in rs)
            errors = sum(r["errors"] for r in rs)
            summary[f"{side} c={level}"] = {"tok_s": tps, "ttft_p50_ms": p50, "ttft_p99_ms": p99, "errors": errors}
            print(f"| {side} | {level} | {tps:.1f} | {p50:.0f} | {p99:.0f} | {errors} | {tps / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "args": {k: str(v) for k, v in vars(args).items()},
                                    "summary": summary, "raw": results}, indent=1, default=str))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
