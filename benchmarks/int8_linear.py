"""The layers' int8 products alone: onnxruntime's nodes against our operators (``toolkit.artifact.native_linear``).

Two kinds, each as a graph of ``--layers`` independent products of one ``[rows, K]`` input (distinct
random weights, so they stream from memory as a decode step's do):

- ``block``: 8-bit ``MatMulNBits`` (blocks of 32, ``accuracy_level`` 4; the default model's qkv and down
  products) against ``Int8BlockMatMul``;
- ``rowwise``: the export's per-row int8 linear (``toolkit.export.rowwise_int8``: the nodes quantizing the
  input, ``MatMulIntegerToFloat``, ``Mul``; o, gate and up) against ``RowwiseInt8MatMul``.

Every (kind, side) runs in a process of its own with one session, which stops its workers spinning when
a run returns as serving's do: two sessions in one process spin against each other and measure neither.
Sides alternate, ``--rounds`` times; printed: median milliseconds per graph and multiply-adds per second.

    python benchmarks/int8_linear.py [--shapes 640x1536,2048x640,1024x640,640x2048] [--rows 1,16,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def build(kind: str, side: str, k: int, n: int, layers: int):
    """The graph of ``layers`` products (``side``: ``onnxruntime`` as exported, ``ours`` swapped)."""
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.artifact import native_linear
    from toolkit.export import rowwise_int8

    rng = np.random.default_rng(0)
    scratch = helper.make_graph([], "g", [], [])
    nodes, outputs = [], []
    if kind == "rowwise":
        rowwise_int8.add_constants(scratch)
        quantize, q, scale = rowwise_int8.activation_nodes("x")
        nodes += quantize
    for i in range(layers):
        if kind == "rowwise":
            nodes += rowwise_int8.linear_nodes(scratch, f"p{i}", q, scale, rng.standard_normal((k, n)).astype(np.float32), f"y{i}", f"w{i}")
        else:
            scratch.initializer.extend([
                numpy_helper.from_array(rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8), f"B{i}"),
                numpy_helper.from_array((rng.random(n * (k // 32), dtype=np.float32) * 0.02).astype(np.float32), f"S{i}")])
            nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"S{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=k, N=n, bits=8, block_size=32, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])], outputs,
                              list(scratch.initializer))
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    if side == "ours" and not native_linear.swap_linears(model):
        raise SystemExit(f"our operators cannot run here: {native_linear.unavailable_reason() or 'the library does not build'}")
    return model


def child(args) -> None:
    import onnxruntime as ort

    from toolkit.artifact import native_linear

    model = build(args.kind, args.side, args.k, args.n, args.layers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if native_linear.uses_operators(model):
        options.register_custom_ops_library(str(native_linear.library()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((args.rows, args.k)).astype(np.float32)
    times = []
    for _ in range(args.repeats + 3):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1000 * float(np.median(times[3:]))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="640x1536,2048x640,1024x640,640x2048", help="KxN, comma-separated")
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-rows", dest="one_rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.rows = args.one_rows
        child(args)
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from op_profile import cpu_line

    print(f"CPU: {cpu_line()}; threads {args.threads}; {args.layers} products per graph; medians of {args.repeats} runs")
    print(f"{'kind':8} {'K x N':>11} {'rows':>5} {'onnxruntime ms':>15} {'ours ms':>9} {'speed-up':>9} {'ours G/s':>9}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for kind in ("block", "rowwise"):
            if kind == "block" and k % 32:
                continue
            for rows in (int(r) for r in args.rows.split(",")):
                best = {"onnxruntime": [], "ours": []}
                for round_ in range(args.rounds):
                    for side in (("onnxruntime", "ours") if round_ % 2 == 0 else ("ours", "onnxruntime")):
                        out = subprocess.run([sys.executable, __file__, "--child", "--kind", kind, "--side", side, "--k", str(k),
                                              "--n", str(n), "--one-rows", str(rows), "--threads", str(args.threads),
                                              "--layers", str(args.layers), "--repeats", str(args.repeats)],
                                             capture_output=True, text=True, check=True).stdout
                        best[side].append(json.loads(out.strip().splitlines()[-1])["ms"])
                theirs, ours = np.median(best["onnxruntime"]), np.median(best["ours"])
                rate = args.layers * k * n * rows / (ours / 1000) / 1e9
                print(f"{kind:8} {f'{k}x{n}':>11} {rows:>5} {theirs:>15.2f} {ours:>9.2f} {theirs / ours:>8.2f}x {rate:>9.0f}")


if __name__ == "__main__":
    main()
