"""Speculative decoding on the default model (int8 gqa engine), batch 1: decode speed and acceptance.

Four modes, each a request through the engine (no HTTP), greedy:

- *plain*: an engine with speculation off (``SpeculativeConfig(enabled=False)``: the graph as exported);
- *lookup*: prompt-lookup drafts only (``toolkit serve --prompt-lookup``; the default on fp32 engines only), no ``prediction``;
- *prediction*: the same engine, the request carrying OpenAI's ``prediction`` (the original file);

on the *editing workload* (``bench/workloads.py``: a ~440-token Python file, "rename a method",
prediction = the file), and *plain* vs *lookup* on the *free-text workload* (a story), greedy and
sampled at temperature 1 (seeded; the sampled runs draw different tokens, only their speed compares):
where little is accepted they show what speculation costs.

Decode speed is (completion tokens - 1) / (time from the first output to the last), so prefill
is left out. Modes alternate within each round (the order reversed every other round) so every
mode sees the same background load. Usage::

    python benchmarks/speculative.py [--rounds 2] [--max-tokens 200] [--threads N] [--workloads editing,...] [ENGINE_DIR]

Prints the CPU, every run, then per workload and mode the median tok/s, its ratio to plain, the
draft acceptance (accepted / drafted tokens) and whether the tokens equal plain decoding's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_cache import DEFAULT_ENGINE, cpu_line  # noqa: E402


async def one_run(engine, prompt_ids, max_tokens: int, prediction_ids=None, temperature: float = 0.0) -> dict:
    """Tokens, decode tok/s and the engine's draft counters for one greedy request."""
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.runtime.types import GenerateRequest

    spec = engine.speculator
    before = (spec.drafted, spec.accepted) if spec is not None else (0, 0)
    request = GenerateRequest(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=7, ignore_eos=True),
                              prediction_ids=prediction_ids)
    tokens, first, last, out = [], None, None, None
    async for out in await engine.generate(request):
        now = time.perf_counter()
        first = first or now
        last = now
        for choice in out.choices:
            tokens.extend(choice.token_ids)
    drafted, accepted = ((spec.drafted - before[0], spec.accepted - before[1]) if spec is not None else (0, 0))
    return {"tokens": tokens, "tok_s": (len(tokens) - 1) / (last - first) if last > first else 0.0,
            "drafted": drafted, "accepted": accepted,
            "prediction": (out.accepted_prediction_tokens, out.rejected_prediction_tokens)}


async def main(engine_dir: Path, rounds: int, max_tokens: int, threads: int | None, workloads: set[str]) -> None:
    from toolkit.bench.workloads import EDIT_FILE_TEXT, FREE_TEXT_QUESTION, editing_messages
    from toolkit.runtime import load_engine
    from toolkit.runtime.speculative import SpeculativeConfig

    print(cpu_line())
    plain = load_engine(engine_dir, threads=threads, speculative=SpeculativeConfig(enabled=False))
    spec = load_engine(engine_dir, threads=threads, speculative=SpeculativeConfig(prompt_lookup=True, predicted_outputs=True))  # on whatever the precision
    await plain.start()
    await spec.start()
    print(f"engine: {engine_dir}; speculative config: {spec.speculative}")
    prompts = spec.prompts
    edit = tuple(prompts.encode(messages=editing_messages()))
    free = tuple(prompts.encode(messages=[{"role": "user", "content": FREE_TEXT_QUESTION}]))
    prediction = tuple(prompts.encode(prompt=EDIT_FILE_TEXT, raw=True))
    print(f"editing prompt {len(edit)} tokens, prediction {len(prediction)} tokens; free-text prompt {len(free)} tokens; "
          f"max_tokens {max_tokens}")
    modes = [("editing", "plain", plain, edit, None, 0.0), ("editing", "lookup", spec, edit, None, 0.0),
             ("editing", "prediction", spec, edit, prediction, 0.0),
             ("free-text", "plain", plain, free, None, 0.0), ("free-text", "lookup", spec, free, None, 0.0),
             ("free-text T=1", "plain", plain, free, None, 1.0), ("free-text T=1", "lookup", spec, free, None, 1.0)]
    modes = [m for m in modes if m[0] in workloads]
    await one_run(plain, free, 8)  # warm both sessions
    await one_run(spec, free, 8)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for workload, mode, engine, prompt, pred, temperature in (modes if r % 2 == 0 else modes[::-1]):
            run = await one_run(engine, prompt, max_tokens, pred, temperature)
            results.setdefault((workload, mode), []).append(run)
            print(f"round {r}: {workload:9s} {mode:10s} {run['tok_s']:7.1f} tok/s  {len(run['tokens'])} tokens  "
                  f"drafted {run['drafted']} accepted {run['accepted']}  prediction accepted/rejected {run['prediction']}")
    await plain.stop()
    await spec.stop()
    print("\n| workload | mode | decode tok/s (median) | vs plain | acceptance | tokens = plain |")
    print("|---|---|---|---|---|---|")
    for (workload, mode), runs in results.items():
        base = statistics.median(x["tok_s"] for x in results[(workload, "plain")])
        rate = statistics.median(x["tok_s"] for x in runs)
        drafted, accepted = sum(x["drafted"] for x in runs), sum(x["accepted"] for x in runs)
        same = all(x["tokens"] == results[(workload, "plain")][0]["tokens"] for x in runs)  # T=1: different draws, "NO" expected
        acceptance = f"{accepted}/{drafted} = {accepted / drafted:.2f}" if drafted else "-"
        print(f"| {workload} | {mode} | {rate:.1f} | {rate / base:.2f}x | {acceptance} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir", nargs="?", type=Path, default=DEFAULT_ENGINE)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workloads", default="editing,free-text,free-text T=1",
                        help="comma-separated subset of: editing, free-text, free-text T=1")
    args = parser.parse_args()
    asyncio.run(main(args.engine_dir, args.rounds, args.max_tokens, args.threads, set(args.workloads.split(","))))
