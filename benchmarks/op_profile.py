"""Where a batched decode step's time goes, per onnxruntime operator (issue #13, "Batched throughput").

For each engine directory and batch size: a GQA decode step (one new token per row, every row
holding ``--context`` cached tokens, as in ``toolkit bench --offline``'s 108-token prompt plus part
of its 128 generated tokens) is run ``--steps`` times under onnxruntime's profiler
(``SessionOptions.enable_profiling``, https://onnxruntime.ai/docs/performance/tune-performance/profiling-tools.html),
and the kernel times are summed per operator type and per node; engines are alternated step by
step (one profiling session each) so that a neighbour's load hits every engine alike. Also
printed: the step's wall and process-CPU time without the profiler, alternated the same way, and
the Python side of a step (the logits copy out of onnxruntime and the
greedy argmax over the vocabulary).

The graph is profiled as exported, except for ``--attention``: an int8 engine's LM head shows up as
``MatMulIntegerToFloat`` here, while serving runs it on ``toolkit.runtime.native_head``'s kernel where
the CPU allows (``benchmarks/native_head.py`` times the two against each other). ``--attention
onnxruntime,ours`` profiles each engine twice, with onnxruntime's ``GroupQueryAttention`` and with
ours (``toolkit.artifact.native_attention``, over the cache type serving picks, ``cache_dtype``);
``all`` also puts the int8 products on our operators (``toolkit.artifact.native_linear``), as serving does
(the LM head then on ``RowwiseInt8MatMul``, the same tiles as serving's head kernel).

    python benchmarks/op_profile.py ENGINE_DIR [ENGINE_DIR ...] [--batches 1,16,32,64] [--attention onnxruntime,ours,all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def cpu_line() -> str:
    """The CPU model and whether it has AVX-512 VNNI / AMX (the int8 kernels onnxruntime picks depend on them)."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("Flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(wanted)}"


def make_session(model: Path, threads: int, profile_prefix: str | None, spinning: bool | None = None,
                 attention: str = "onnxruntime"):
    """A session like ``toolkit.artifact.onnx_session.create_session``'s, optionally profiling; ``attention``
    ``"ours"``: the graph's GroupQueryAttention on our operator, as the serving runner swaps it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # as serving sessions do (toolkit.artifact.onnx_session.create_session): each profiled engine has a
    # session of its own, and without this one session's idle workers spun on the cores while the other
    # ran (steps ~1.9x slower than served, our operators' parallel loops hit hardest)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if attention in ("ours", "all"):
        import onnx

        from toolkit.artifact import native_attention, native_linear
        from toolkit.artifact.layout import head_size
        from toolkit.artifact.manifest import load_manifest

        graph = onnx.load(str(model), load_external_data=False)
        cache = native_attention.cache_dtype(load_manifest(model.parent).precision)
        if not native_attention.swap_attention(graph, head_size(graph, model), cache):
            raise SystemExit(f"{model}: our attention operator cannot run here (toolkit.artifact.native_attention)")
        options.register_custom_ops_library(str(native_attention.library()))
        if attention == "all":
            if not native_linear.swap_linears(graph):
                raise SystemExit(f"{model}: our int8 operators cannot run here (toolkit.artifact.native_linear)")
            options.register_custom_ops_library(str(native_linear.library()))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.parent))
        return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


class DecodeStep:
    """One batched decode step over preallocated, shared past/present buffers (as ``GqaModelRunner.decode``)."""

    def __init__(self, session, engine_dir: Path, rows: int, context: int):
        import onnxruntime as ort

        from toolkit.artifact.layout import kv_spec
        from toolkit.runtime.shared_kv import round_up

        self.session = session
        spec = kv_spec(session, engine_dir / "model.onnx")
        capacity = round_up(context + 1)
        rng = np.random.default_rng(0)
        self.ids = rng.integers(100, 20000, size=(rows, 1), dtype=np.int64)
        self.mask = np.ones((rows, context + 1), np.int64)
        self.buffers = {
            name: (rng.standard_normal((rows, spec.num_kv_heads, capacity, spec.head_dim)) * 0.1).astype(spec.dtype)
            for name in spec.past_names
        }
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(b) for name, b in self.buffers.items()}

    def run(self) -> tuple[float, float, float]:
        """(model seconds, python seconds: logits out of onnxruntime + greedy argmax, process CPU seconds of the model run)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", self.ids)
        binding.bind_cpu_input("attention_mask", self.mask)
        binding.bind_output("logits")
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
        cpu, start = time.process_time(), time.perf_counter()
        self.session.run_with_iobinding(binding)
        mid, cpu = time.perf_counter(), time.process_time() - cpu
        logits = binding.get_outputs()[0].numpy()[:, -1].astype(np.float32, copy=False)
        logits.argmax(axis=-1)
        return mid - start, time.perf_counter() - mid, cpu


def aggregate(profile_file: Path, steps: int) -> tuple[dict[str, float], dict[str, tuple[str, float]]]:
    """Per-op-type and per-node kernel milliseconds per step from an onnxruntime profile (model_run events excluded)."""
    events = json.loads(profile_file.read_text())
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, list] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        node = event["name"][: -len("_kernel_time")]
        ms = event["dur"] / 1000.0 / steps
        by_op[op] += ms
        by_node.setdefault(node, [op, 0.0])[1] += ms
    return dict(by_op), {node: (op, ms) for node, (op, ms) in by_node.items()}


def variants(engines: list[Path], attentions: list[str]) -> list[tuple[str, Path, str]]:
    """(name, engine, attention) for every engine and attention asked for."""
    return [(str(engine) if len(attentions) == 1 else f"{engine} [{attention}]", engine, attention)
            for engine in engines for attention in attentions]


def profile_engines(engines: list[Path], rows: int, context: int, steps: int, threads: int, spinning: bool | None,
                    attentions: tuple[str, ...] = ("onnxruntime",)) -> dict:
    """Profile ``steps`` decode steps per engine (after warm-up), the engines alternated step by step; per-engine aggregates."""
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        steppers = {}
        for i, (name, engine, attention) in enumerate(variants(engines, list(attentions))):
            session = make_session(engine / "model.onnx", threads, str(Path(tmp) / f"profile-{i}"), spinning, attention)
            steppers[name] = DecodeStep(session, engine, rows, context)
        for _ in range(2):
            for stepper in steppers.values():
                stepper.run()
        for _ in range(steps):
            for stepper in steppers.values():
                stepper.run()
        out = {}
        for name, stepper in steppers.items():
            profile_file = Path(stepper.session.end_profiling())
            events = json.loads(profile_file.read_text())
            # the profiler records from session start: keep only the last ``steps`` model runs (warm-up dropped)
            runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            cut = runs[-steps]["ts"] if len(runs) >= steps else 0
            kept = [e for e in events if e.get("ts", 0) >= cut]
            profile_file.write_text(json.dumps(kept))
            by_op, by_node = aggregate(profile_file, steps)
            run_ms = sum(e["dur"] for e in kept if e.get("name") == "model_run") / 1000.0 / steps
            out[name] = {"rows": rows, "model_run_ms": run_ms, "by_op": by_op, "by_node": by_node}
    return out


def time_engines(engines: list[Path], rows: int, context: int, steps: int, threads: int, spinning: bool | None,
                 attentions: tuple[str, ...] = ("onnxruntime",)) -> dict:
    """Median step time (model wall, python, model process-CPU) per engine, alternating engines step by step.

    Process CPU time is less sensitive than wall time to other processes taking the cores (this
    machine is shared); with spinning threads it also counts the spin.
    """
    steppers = {}
    for name, engine, attention in variants(engines, list(attentions)):
        steppers[name] = DecodeStep(make_session(engine / "model.onnx", threads, None, spinning, attention), engine, rows, context)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in steppers}
    for _ in range(2):
        for stepper in steppers.values():
            stepper.run()
    for _ in range(steps):
        for name, stepper in steppers.items():
            samples[name].append(stepper.run())
    result = {}
    for name, values in samples.items():
        model_ms = float(np.median([v[0] for v in values])) * 1000
        python_ms = float(np.median([v[1] for v in values])) * 1000
        cpu_ms = float(np.median([v[2] for v in values])) * 1000
        result[name] = {"model_ms": model_ms, "python_ms": python_ms, "model_cpu_ms": cpu_ms,
                        "tok_s": rows / ((model_ms + python_ms) / 1000)}
    del steppers
    return result


def print_profile(name: str, prof: dict, top: int) -> None:
    total = sum(prof["by_op"].values())
    print(f"\n{name} — batch {prof['rows']}: model_run {prof['model_run_ms']:.1f} ms/step, kernels {total:.1f} ms")
    print(f"  {'operator':34s} {'ms/step':>9s} {'share':>7s}")
    for op, ms in sorted(prof["by_op"].items(), key=lambda kv: -kv[1]):
        print(f"  {op:34s} {ms:9.2f} {100 * ms / total:6.1f}%")
    print(f"  top {top} nodes:")
    for node, (op, ms) in sorted(prof["by_node"].items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {node:60s} {op:24s} {ms:8.2f} ms {100 * ms / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", type=Path, help="engine directories (each with model.onnx)")
    parser.add_argument("--batches", default="1,16,32,64")
    parser.add_argument("--context", type=int, default=170, help="cached tokens per row (108-token prompt + ~62 generated)")
    parser.add_argument("--steps", type=int, default=10, help="profiled (and timed) steps per batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--spinning", choices=["default", "on", "off"], default="default",
                        help="session.intra_op.allow_spinning (default: onnxruntime's own, on)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-profile", action="store_true", help="only the alternated step timing")
    parser.add_argument("--attention", default="onnxruntime",
                        help="comma-separated: onnxruntime (the graph as exported), ours (toolkit.artifact.native_attention), "
                             "all (our attention and int8 products, toolkit.artifact.native_linear)")
    parser.add_argument("--json", type=Path, help="save everything here")
    args = parser.parse_args()
    spinning = {"default": None, "on": True, "off": False}[args.spinning]
    batches = [int(b) for b in args.batches.split(",")]
    attentions = tuple(a.strip() for a in args.attention.split(","))
    if not set(attentions) <= {"onnxruntime", "ours", "all"}:
        parser.error(f"--attention: onnxruntime, ours and / or all, not {args.attention!r}")
    print(f"CPU: {cpu_line()}; threads {args.threads}; context {args.context}; spinning {args.spinning}")
    out: dict = {"cpu": cpu_line(), "threads": args.threads, "context": args.context, "profiles": {}, "timing": {}}
    for rows in batches:
        timing = time_engines(args.engines, rows, args.context, args.steps, args.threads, spinning, attentions)
        out["timing"][rows] = timing
        print(f"\nbatch {rows}: step time, engines alternated step by step ({args.steps} steps, median)")
        for name, t in timing.items():
            print(f"  {name:40s} model {t['model_ms']:8.2f} ms (CPU {t['model_cpu_ms']:8.2f} ms)"
                  f"  python {t['python_ms']:6.2f} ms  {t['tok_s']:8.1f} tok/s")
        if args.no_profile:
            continue
        for engine, prof in profile_engines(args.engines, rows, args.context, args.steps, args.threads, spinning, attentions).items():
            out["profiles"].setdefault(engine, {})[rows] = prof
            print_profile(engine, prof, args.top)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nsaved {args.json}")


if __name__ == "__main__":
    main()
