"""Our engine alone vs llama.cpp's batched API, on the default model, in one run (issue bar for the runtime).

For each concurrency level, alternating which goes first: ``benchmarks/llama_cpp_batched.py`` (N
sequences in one ``llama_decode`` per step, same GGUF, same threads) in the Python that has
``llama_cpp``, and ``toolkit bench --offline``'s measurement of our engine (N requests at once,
greedy, ``ignore_eos``). Same prompt text and length, same output length. Prints the table with
ratios (ours / llama.cpp) and saves it as JSON.

    python benchmarks/engine_vs_llama_cpp.py --llama-python VENV/bin/python [--levels 1,4,16] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", type=Path, default=None, help="our engine dir (default: the default model's)")
    p.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: assembled into the cache)")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "engine-vs-llama-cpp.json")
    return p.parse_args(argv)


def llama_level(args: argparse.Namespace, gguf: Path, level: int) -> dict:
    """One level of llama.cpp's batched decoding, in a fresh process."""
    command = [
        args.llama_python, str(HERE / "llama_cpp_batched.py"), str(gguf), "--levels", str(level),
        "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])[0]


def ours_level(args: argparse.Namespace, engine_dir: Path, level: int) -> dict:
    """One level of our engine alone (toolkit bench --offline's measurement)."""
    from toolkit.bench.offline import bench_offline

    return asyncio.run(bench_offline(engine_dir, [level], args.prompt_tokens, args.max_tokens, args.threads))[0]


def ratio_rows(ours: list[dict], peer: list[dict]) -> list[dict]:
    """Side-by-side rows: throughput, TTFT and ITL of both, and ours / llama.cpp throughput."""
    rows = []
    for a, b in zip(ours, peer):
        rows.append({
            "concurrency": a["concurrency"],
            "ours_tok_s": round(a["output_tokens_per_s"], 1),
            "llama_tok_s": b["out_tok_s"],
            "ratio": round(a["output_tokens_per_s"] / b["out_tok_s"], 2),
            "ours_ttft_ms": round(a["ttft_ms_p50"]),
            "llama_ttft_ms": round(b["ttft_ms"]),
            "ours_itl_p50_ms": round(a["itl_ms_p50"], 1),
            "llama_itl_p50_ms": b["itl_p50_ms"],
            "ours_overhead_pct": a.get("overhead_pct"),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from toolkit.export.pipeline import ensure_default_engine
    from toolkit.export.progress import StageReporter

    engine_dir = args.engine or ensure_default_engine(StageReporter())
    gguf = args.gguf
    if gguf is None:
        from toolkit.export.default_model import assemble_gguf
        from toolkit.export.sources import cache_dir

        gguf = next((cache_dir() / "gguf").glob("*.gguf"), None) or assemble_gguf(cache_dir() / "gguf")
    ours, peer = [], []
    for i, level in enumerate(int(x) for x in args.levels.split(",")):
        order = (("llama", llama_level), ("ours", ours_level)) if i % 2 == 0 else (("ours", ours_level), ("llama", llama_level))
        for name, run in order:
            result = run(args, gguf if name == "llama" else engine_dir, level)
            (peer if name == "llama" else ours).append(result)
            print(f"level {level} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    rows = ratio_rows(ours, peer)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": str(engine_dir), "rows": rows, "ours": ours, "llama_cpp": peer}, indent=2))
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
