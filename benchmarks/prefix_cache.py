"""TTFT with and without a prefix-cache hit on the default model (int8 gqa engine).

Each run sends one request whose first ~1,000 tokens are a shared "system prompt" (the start of
README.md, as raw text) followed by a short question, and times ``generate`` → first output
(``max_tokens=1``). Runs alternate:

- *uncached*: the shared text preceded by ``Run <k>.``, so not even the first 16-token block matches;
- *cached*: the shared text exactly as the warm-up request sent it, plus a new question, so every
  full block of the shared text comes from the cache and only the tail is prefilled.

Alternating keeps both series exposed to the same background load (other processes on the
machine). Usage::

    python benchmarks/prefix_cache.py [--runs 6] [--prefix-tokens 1000] [--threads N] [ENGINE_DIR]

Prints the CPU (``lscpu`` model name, whether ``avx512_vnni`` is present), every run, and the
medians with their ratio (the goal: cached <= 20 % of uncached).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENGINE = Path.home() / ".cache" / "toolkit" / "engines" / "default-onnx-gqa-int8"


def cpu_line() -> str:
    """``lscpu``'s model name and whether the CPU has AVX-512 VNNI (int8 dot products)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else lscpu
    return f"CPU: {model}; avx512_vnni: {'yes' if 'avx512_vnni' in flags else 'no'}"


async def ttft(engine, prompt_ids: list[int]) -> tuple[float, int]:
    """Seconds from ``generate`` to the first output, and the cached_tokens it reported."""
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.runtime.types import GenerateRequest

    request = GenerateRequest(prompt_ids, SamplingParams(max_tokens=1, temperature=0))
    started = time.perf_counter()
    stream = await engine.generate(request)
    first = await stream.__anext__()
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return elapsed, first.cached_tokens


async def main(engine_dir: Path, runs: int, prefix_tokens: int, threads: int | None) -> None:
    from toolkit.runtime import load_engine

    print(cpu_line())
    engine = load_engine(engine_dir, threads=threads)
    await engine.start()
    encode = lambda text: engine.prompts.encode(prompt=text, raw=True)  # noqa: E731
    shared = engine.prompts.detokenize(encode((ROOT / "README.md").read_text())[:prefix_tokens])
    questions = [f"\n\nQuestion {k}: summarise the section above in one sentence.\nAnswer:" for k in range(runs + 1)]
    prompt_of = lambda head, k: encode(head + shared + questions[k])  # noqa: E731
    warm, cached_tokens = await ttft(engine, prompt_of("", runs))  # fills the cache (and warms the session)
    print(f"engine: {engine_dir}; prompt ~{len(prompt_of('', 0))} tokens; warm-up {warm * 1000:.0f} ms")
    series: dict[str, list[float]] = {"uncached": [], "cached": []}
    for k in range(runs):
        for kind in ("uncached", "cached"):
            ids = prompt_of(f"Run {k}. " if kind == "uncached" else "", k)
            seconds, cached_tokens = await ttft(engine, ids)
            series[kind].append(seconds)
            print(f"run {k} {kind:>8}: {len(ids)} prompt tokens, {cached_tokens} cached, TTFT {seconds * 1000:.0f} ms")
    await engine.stop()
    med = {kind: statistics.median(values) for kind, values in series.items()}
    for kind, values in series.items():
        print(f"{kind:>8}: median {med[kind] * 1000:.0f} ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})")
    print(f"cached / uncached (medians): {med['cached'] / med['uncached']:.1%} (goal <= 20 %)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", nargs="?", type=Path, default=DEFAULT_ENGINE)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.engine_dir, args.runs, args.prefix_tokens, args.threads))
