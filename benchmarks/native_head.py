"""The int8 LM head alone: onnxruntime's MatMulIntegerToFloat (MLAS) against our kernel (runtime/native_head).

Loads an int8 engine's per-row LM head weights (default: the default model's gqa int8 engine,
262,144 x 640), then for each row count runs both on the same random uint8 rows, alternating which
goes first, and prints the median milliseconds, the ratio, and whether the logits are bitwise equal.
The CPU line names the flags that pick both sides' kernels. A second table times a whole decode step
(``GqaModelRunner``, the graph plus the head) with the head in the graph and on the kernel, each in a
fresh process, alternated, when ``--steps`` is given.

    python benchmarks/native_head.py [--engine DIR] [--rows 1,4,16,32,64] [--threads 2] [--repeats 15] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_ENGINE = Path.home() / ".cache/toolkit/engines/default-onnx-gqa-int8"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=DEFAULT_ENGINE)
    p.add_argument("--rows", default="1,4,16,32,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=0, help="also time N decode steps of a 16-row batch per side")
    p.add_argument("--step-rows", type=int, default=16)
    p.add_argument("--step-child", choices=["graph", "native"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def head_weights(engine: Path) -> tuple[np.ndarray, np.ndarray]:
    """The engine's per-row int8 LM head: (int8 [K, N], column scales [N])."""
    import onnx

    from toolkit.runtime.native_head import rowwise_head

    found = rowwise_head(onnx.load(str(engine / "model.onnx"), load_external_data=False), engine)
    if found is None:
        raise SystemExit(f"{engine} has no per-row int8 LM head")
    return found.weight, found.col_scale.astype(np.float32)


def head_table(args: argparse.Namespace) -> list[dict]:
    from toolkit.runtime.native_head import Int8Head, reference_session

    weight, col_scale = head_weights(args.engine)
    session = reference_session(weight, col_scale, args.threads)
    head = Int8Head(weight, col_scale, args.threads)
    rng = np.random.default_rng(0)
    rows_out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        q = rng.integers(0, 256, (rows, weight.shape[0]), dtype=np.uint8)
        row_scale = (rng.random((rows, 1), dtype=np.float32) * 0.05).astype(np.float32)
        out = np.empty((rows, weight.shape[1]), np.float32)
        reference = session.run(None, {"q": q, "rs": row_scale})[0]
        head(q, row_scale, out)
        times = {"mlas": [], "native": []}
        for i in range(args.repeats):
            order = ("mlas", "native") if i % 2 == 0 else ("native", "mlas")
            for side in order:
                start = time.perf_counter()
                session.run(None, {"q": q, "rs": row_scale}) if side == "mlas" else head(q, row_scale, out)
                times[side].append(time.perf_counter() - start)
        mlas, native = (float(np.median(times[s])) * 1e3 for s in ("mlas", "native"))
        rows_out.append({"rows": rows, "mlas_ms": round(mlas, 2), "native_ms": round(native, 2),
                         "speedup": round(mlas / native, 2), "bitwise_equal": bool(np.array_equal(reference.view(np.uint32), out.view(np.uint32)))})
    return rows_out


def step_child(args: argparse.Namespace) -> None:
    """One side's decode-step medians, in this process (the parent alternates processes)."""
    from toolkit.runtime.gqa_runner import GqaModelRunner

    runner = GqaModelRunner(args.engine / "model.onnx", args.threads)
    assert (runner.head is not None) == (args.step_child == "native"), "the head did not land where asked"
    rng = np.random.default_rng(0)
    batch, last = runner.new_batch(), []
    for i in range(args.step_rows):
        logits, past = runner.prefill(rng.integers(100, 20000, 100 + i).tolist(), None, 0)
        last.append(int(logits.argmax()))
        batch.add_rows(past, [100 + i])
    batch.reserve(batch.size, max(batch.lengths) + args.steps + 1)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits = runner.decode(batch, last, list(batch.lengths))
        last = [int(t) for t in logits.argmax(-1)]
        times.append(time.perf_counter() - start)
    print(json.dumps({"side": args.step_child, "step_ms": float(np.median(times)) * 1e3}))


def step_table(args: argparse.Namespace, rounds: int = 2) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {"graph": [], "native": []}
    for i in range(rounds):
        for side in (("graph", "native") if i % 2 == 0 else ("native", "graph")):
            env = {**os.environ, "TOOLKIT_NATIVE_HEAD": "1" if side == "native" else "0"}
            command = [sys.executable, __file__, "--engine", str(args.engine), "--threads", str(args.threads),
                       "--steps", str(args.steps), "--step-rows", str(args.step_rows), "--step-child", side]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            seen[side].append(round(json.loads(done.stdout.strip().splitlines()[-1])["step_ms"], 1))
    return seen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step_child:
        step_child(args)
        return
    from peer.cpu import read_cpu

    from toolkit.runtime.native_head import unavailable_reason

    print(read_cpu().summary())
    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"the kernel cannot run here: {reason}")
    print(f"{'rows':>5} {'MLAS ms':>9} {'ours ms':>9} {'speed-up':>9}  bitwise")
    for row in head_table(args):
        print(f"{row['rows']:>5} {row['mlas_ms']:>9.2f} {row['native_ms']:>9.2f} {row['speedup']:>8.2f}x  {row['bitwise_equal']}")
    if args.steps:
        seen = step_table(args)
        print(f"decode step, {args.step_rows} rows, median of {args.steps} (each side twice, alternated): "
              f"head in the graph {seen['graph']} ms, on the kernel {seen['native']} ms")


if __name__ == "__main__":
    main()
