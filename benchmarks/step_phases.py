"""Where a served decode step's time goes: onnxruntime, the int8 LM head kernel, and Python (issue 13).

``benchmarks/op_profile.py`` splits onnxruntime's own time by operator; this script times the engine
as it serves: the default model's int8 ``gqa`` engine loaded with the serving ``SchedulerConfig``,
``--clients`` closed-loop in-process clients (each sends ``--requests`` greedy requests of a
108-token prompt, unique from its second token so no prefix is shared, 128 tokens with
``ignore_eos``), after a warm-up of two clients. Every engine step is timed, and inside it the
onnxruntime runs (``InferenceSession.run_with_iobinding``) and the LM head kernel calls
(``Int8Head``); what is left of a step is Python (scheduling, sampling, the KV bookkeeping and
handing tokens to the streams).

Printed: tokens per second, the medians of the three parts over the steps that decode
``--clients`` rows and run no prompt, and the time in steps that also ran prompt chunks. With
``--rounds N`` the whole measurement repeats N times in fresh processes (the VM's speed drifts
between runs; compare code versions in alternated rounds).

    python benchmarks/step_phases.py [--engine DIR] [--clients 16] [--requests 3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_profile import cpu_line  # noqa: E402

ENGINE = Path.home() / ".cache" / "toolkit" / "engines" / "default-onnx-gqa-int8"


class StepClock:
    """Per-step seconds of a step, its onnxruntime runs and its LM head kernel calls."""

    def __init__(self, engine) -> None:
        self.parts = {"ort": 0.0, "head": 0.0}
        self.steps: list[tuple[int, int, float, float, float]] = []  # rows, prompt chunks, step, ort, head
        runner = engine.runner
        runner.session.run_with_iobinding = self._timed("ort", runner.session.run_with_iobinding)
        head = getattr(runner, "head", None)
        if head is not None:
            object.__setattr__(head, "head", _Timed(head.head, self, "head"))  # HeadSplit is frozen
        step = engine.step

        def timed_step(plan) -> None:
            self.parts["ort"] = self.parts["head"] = 0.0
            started = time.perf_counter()
            step(plan)
            self.steps.append((plan.rows, len(plan.prefill), time.perf_counter() - started,
                               self.parts["ort"], self.parts["head"]))

        engine.step = timed_step

    def _timed(self, part: str, call):
        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - started
        return wrapped


class _Timed:
    """A callable's stand-in that adds its time to a ``StepClock`` part (attributes pass through)."""

    def __init__(self, inner, clock: StepClock, part: str) -> None:
        self._inner, self._call = inner, clock._timed(part, inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


async def measure(engine_dir: Path, clients: int, requests: int) -> dict:
    from toolkit.runtime import load_engine
    from toolkit.runtime.sampling_params import SamplingParams
    from toolkit.runtime.scheduler import SchedulerConfig
    from toolkit.runtime.types import GenerateRequest

    engine = load_engine(engine_dir, config=SchedulerConfig())
    await engine.start()
    clock = StepClock(engine)
    tokenizer = engine.prompts.tokenizer
    filler = tokenizer("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)["input_ids"]
    numbers = iter(range(10**6))

    async def client() -> None:
        for _ in range(requests):
            ids = [tokenizer.bos_token_id, 1000 + next(numbers)] + filler[:106]
            params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
            async with await engine.generate(GenerateRequest(ids, params)) as stream:
                async for _ in stream:
                    pass

    await asyncio.gather(*[client() for _ in range(2)])  # warm-up
    clock.steps.clear()
    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - started
    await engine.stop()
    steps = np.array(clock.steps, dtype=float)
    decode = steps[(steps[:, 0] == clients) & (steps[:, 1] == 0)]
    step_ms, ort_ms, head_ms = (np.median(decode[:, i]) * 1e3 if len(decode) else float("nan") for i in (2, 3, 4))
    return {"tokens_per_s": clients * requests * 128 / wall, "wall_s": wall, "steps": len(steps),
            "decode_steps": len(decode), "step_ms": step_ms, "ort_ms": ort_ms, "head_ms": head_ms,
            "python_ms": step_ms - ort_ms - head_ms, "prompt_step_s": float(steps[steps[:, 1] > 0, 2].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=ENGINE)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--rounds", type=int, default=1, help="repeat in this many fresh processes")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a round's own process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(args.engine, args.clients, args.requests))))
        return
    print(f"CPU: {cpu_line()}")
    for round_ in range(args.rounds):
        done = subprocess.run([sys.executable, __file__, "--one", "--engine", str(args.engine), "--clients",
                               str(args.clients), "--requests", str(args.requests)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"round {round_ + 1}: {r['tokens_per_s']:.1f} tok/s; {r['decode_steps']} decode-only {args.clients}-row steps, "
              f"median {r['step_ms']:.2f} ms = onnxruntime {r['ort_ms']:.2f} + LM head kernel {r['head_ms']:.2f} "
              f"+ Python {r['python_ms']:.2f}; steps with prompt chunks {r['prompt_step_s']:.2f} s of {r['wall_s']:.2f} s")


if __name__ == "__main__":
    main()
