"""The per-row int8 linear: one activation scale per row (token), one weight scale per output column.

``y = s_row * (q_row . W_int8) * s_col`` with ``s_row = max|x_row| / 127`` and ``q_row = round(x_row /
s_row) + 128`` as uint8 (zero point 128), computed in the graph; the product runs on onnxruntime's
``MatMulIntegerToFloat`` (MLAS's prepacked u8s8 GEMM, VNNI where the CPU has it) with the column
scales, and one ``Mul`` applies the row scales.

Why per row: a row's result depends on that row only, and the int32 accumulation is exact, so a
token's output is the same whether it runs alone, in a 64-row decode batch or in a prompt chunk.
``DynamicQuantizeMatMul`` takes one activation scale for the whole run instead, so a row's logits
move with the rows beside it. On AVX2 machines without VNNI, MLAS's u8s8 kernel sums pairs of
products in 16 bits and can saturate (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html,
"reduce_range"), as it can for ``DynamicQuantizeMatMul``; validation measures what the artifact does
on the machine it runs on.

Op: https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulIntegerToFloat
"""

from __future__ import annotations

import numpy as np

ZERO_POINT = 128
CONSTANTS = {
    "rowwise_int8.zero_point": np.array(ZERO_POINT, np.uint8),
    "rowwise_int8.one": np.array(1.0, np.float32),
    "rowwise_int8.qmax": np.array(127.0, np.float32),
    "rowwise_int8.tiny": np.array(1e-12, np.float32),
    "rowwise_int8.axes": np.array([-1], np.int64),
    "rowwise_int8.offset": np.array(float(ZERO_POINT), np.float32),
}


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per column of ``weight`` ``[K, N]``: (``int8 [K, N]``, ``float32 [N]``)."""
    scales = np.abs(weight).max(axis=0) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(weight / scales[None, :]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)


def add_constants(graph) -> None:
    """The subgraphs' shared scalar initializers, once per graph."""
    from onnx import numpy_helper

    present = {init.name for init in graph.initializer}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in CONSTANTS.items() if k not in present)


def activation_nodes(x: str) -> tuple[list, str, str]:
    """Nodes quantizing activation ``x`` per row; returns (nodes, uint8 tensor, row scale tensor)."""
    from onnx import TensorProto, helper

    p = f"{x}/rowwise_int8"
    nodes = [
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
        helper.make_node("ReduceMax", [f"{p}/abs", "rowwise_int8.axes"], [f"{p}/amax"], name=f"{p}/ReduceMax", keepdims=1),
        helper.make_node("Max", [f"{p}/amax", "rowwise_int8.tiny"], [f"{p}/amax_nz"], name=f"{p}/Max"),
        helper.make_node("Div", [f"{p}/amax_nz", "rowwise_int8.qmax"], [f"{p}/scale"], name=f"{p}/Scale"),
        helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/Div"),
        helper.make_node("Round", [f"{p}/scaled"], [f"{p}/rounded"], name=f"{p}/Round"),
        helper.make_node("Add", [f"{p}/rounded", "rowwise_int8.offset"], [f"{p}/shifted"], name=f"{p}/Add"),
        helper.make_node("Cast", [f"{p}/shifted"], [f"{p}/q"], name=f"{p}/Cast", to=TensorProto.UINT8),
    ]
    return nodes, f"{p}/q", f"{p}/scale"


def linear_nodes(graph, name: str, q: str, row_scale: str, weight: np.ndarray, output: str, prefix: str) -> list:
    """The int8 product of the quantized activation ``q`` with fp32 ``weight`` ``[K, N]`` (quantized
    per column here, stored as ``<prefix>.weight_i8`` / ``.weight_scale``), written to ``output``."""
    from onnx import helper, numpy_helper

    q_weight, col_scale = quantize_columns(weight)
    names = (f"{prefix}.weight_i8", f"{prefix}.weight_scale")
    graph.initializer.extend([numpy_helper.from_array(q_weight, names[0]), numpy_helper.from_array(col_scale, names[1])])
    unscaled = f"{output}/rowwise_int8_unscaled"
    return [
        helper.make_node("MatMulIntegerToFloat", [q, names[0], "rowwise_int8.one", names[1], "rowwise_int8.zero_point"],
                         [unscaled], name=f"{name}/RowwiseInt8", domain="com.microsoft"),
        helper.make_node("Mul", [unscaled, row_scale], [output], name=f"{name}/RowScale"),
    ]
