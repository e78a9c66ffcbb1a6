"""One served decode step with and without one of our native parts, the two runners alternated step by step.

Two ``GqaModelRunner`` s of the same engine, one made with ``$SWITCH=0`` (the part off: onnxruntime's own
nodes) and one without, each holding ``--rows`` rows of ``--context`` cached tokens (random prompts,
prefilled); each step decodes one token for every row and is rolled back, so the cache stays the same
size; the steps alternate between the runners. Printed: the median step of each after ``--warmup``.

    python benchmarks/decode_step_ab.py [--engine DIR] [--rows 1,16] [--switch TOOLKIT_NATIVE_LINEAR] [--steps 30]

Switches: ``TOOLKIT_NATIVE_LINEAR`` (the int8 products, ``toolkit.artifact.native_linear``),
``TOOLKIT_NATIVE_ATTENTION`` (the attention), ``TOOLKIT_NATIVE_HEAD`` (the LM head kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ENGINE = Path.home() / ".cache" / "toolkit" / "engines" / "default-onnx-gqa-int8"


def runner_with(switch: str, on: bool, model: Path, rows: int, context: int):
    """A runner made with ``switch`` unset (on) or ``0`` (off), and its decode batch of ``rows`` prefilled rows."""
    from toolkit.artifact.manifest import load_manifest
    from toolkit.artifact.native_attention import cache_dtype
    from toolkit.runtime.gqa_runner import GqaModelRunner

    saved = os.environ.pop(switch, None)
    if not on:
        os.environ[switch] = "0"
    try:
        runner = GqaModelRunner(model, kv_cache=cache_dtype(load_manifest(model.parent, verify_hashes=False).precision))
    finally:
        os.environ.pop(switch, None)
        if saved is not None:
            os.environ[switch] = saved
    rng = np.random.default_rng(0)
    prefilled = [runner.prefill(rng.integers(100, 20000, context).tolist(), None, 0, logits=False)[1] for _ in range(rows)]
    batch = runner.new_batch()
    batch.add_rows({name: np.concatenate([p[name] for p in prefilled]) for name in prefilled[0]}, [context] * rows)
    return runner, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=ENGINE)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--context", type=int, default=170)
    parser.add_argument("--switch", default="TOOLKIT_NATIVE_LINEAR")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from op_profile import cpu_line

    print(f"CPU: {cpu_line()}; engine {args.engine.name}; {args.context} cached tokens per row; {args.switch} off vs on")
    model = args.engine / "model.onnx"
    for rows in (int(r) for r in args.rows.split(",")):
        sides = {label: runner_with(args.switch, label == "on", model, rows, args.context) for label in ("off", "on")}
        times = {label: [] for label in sides}
        for _ in range(args.steps):
            for label, (runner, batch) in sides.items():
                start = time.perf_counter()
                runner.decode(batch, [5] * rows, [])
                times[label].append(time.perf_counter() - start)
                batch.rollback([0] * rows, 1)
        off, on = (1000 * float(np.median(times[k][args.warmup:])) for k in ("off", "on"))
        print(f"{rows:>3} rows: {args.switch}=0 {off:.2f} ms, on {on:.2f} ms ({off / on:.2f}x)")
        del sides


if __name__ == "__main__":
    main()
