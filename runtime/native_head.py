"""The int8 engines' LM head on our own VNNI kernel (``artifact/native/lm_head_int8.c``), not onnxruntime's.

The per-row int8 LM head (``toolkit.export.rowwise_int8``: ``MatMulIntegerToFloat`` then ``Mul`` by
the row scales) is the largest single product of a decode step on the default model: 262,144 x 640,
a third of a 16-row step. ``split_lm_head`` takes it out of the graph when the session is made (in
memory: the engine directory is not touched), so the graph returns the head's quantized input and
row scales, and ``Int8Head`` computes the logits from them. The integer sums are exact and the float
products are onnxruntime's, in its order, so the logits are bitwise the graph's own where MLAS runs
VNNI (tests/test_native_head.py); only the time differs (benchmarks/native_head.py).

The kernel is C with AVX-512 VNNI intrinsics, built on first use (``toolkit.artifact.native_build``)
and loaded with ctypes. It is used only where all of these hold; otherwise the head stays in the
graph, exactly as exported:

- ``$TOOLKIT_NATIVE_HEAD`` is not ``0``;
- the CPU reports ``avx512f``, ``avx512bw`` and ``avx512_vnni`` (``/proc/cpuinfo``). On AVX2-only CPUs
  MLAS sums pairs of products in 16 bits (vpmaddubsw) and can saturate, so its logits are not the exact
  ones this kernel computes; staying on MLAS there keeps one engine's outputs the same on one machine;
- a C compiler builds the source;
- the graph's LM head is the per-row int8 pattern with activation scale 1 and zero point 128, and the
  hidden size is a multiple of 4.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.artifact import native_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parents[1] / "artifact" / "native" / "lm_head_int8.c"
ENV_SWITCH = "TOOLKIT_NATIVE_HEAD"
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
# -fno-tree-pre / -fno-gcse: with them GCC 12 keeps the 24 accumulators in registers; without them it
# spilled them to the stack on every step of the inner loop at -O3 (2-3x slower, seen in the assembly).
CFLAGS = ("-O2", "-fno-tree-pre", "-fno-gcse", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fPIC", "-shared", "-pthread")
TILE_N = 48  # the kernel's column tile (TILE_N in the C source): packed columns are padded to it
MAX_ARGMAX_ROWS = 256  # MAX_ARGMAX_ROWS in the C source
ZERO_POINT = 128


def unavailable_reason(flags: frozenset[str] | None = None) -> str | None:
    """Why the kernel cannot run here (``toolkit.artifact.native_build.unavailable_reason``), or None when it can be tried."""
    return native_build.unavailable_reason(ENV_SWITCH, REQUIRED_CPU_FLAGS, flags)


def build_library(source: Path = SOURCE, out_dir: Path | None = None) -> Path:
    """The LM head kernel's shared library (``toolkit.artifact.native_build.build_library``)."""
    return native_build.build_library(source, CFLAGS, out_dir)


_library: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """The kernel's library, built if needed (``build_library``), loaded once per process."""
    global _library
    if _library is None:
        lib = ctypes.CDLL(str(build_library()))
        p = ctypes.c_void_p
        lib.toolkit_int8_head.argtypes = [p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p, p, p, ctypes.c_int, p]
        lib.toolkit_int8_head.restype = ctypes.c_int
        _library = lib
    return _library


class Int8Head:
    """``logits = (q . W - 128 colsum(W)) * col_scale * row_scale`` for uint8 ``q`` and int8 ``W [K, N]``."""

    def __init__(self, weight: np.ndarray, col_scale: np.ndarray, threads: int):
        k, n = weight.shape
        if weight.dtype != np.int8 or k % 4:
            raise ValueError(f"the kernel takes int8 weights with a hidden size divisible by 4, not {weight.dtype} {weight.shape}")
        self.hidden, self.vocab, self.threads = k, n, max(1, threads)
        padded = -(-n // TILE_N) * TILE_N
        wide = weight if padded == n else np.pad(weight, ((0, 0), (0, padded - n)))  # zero columns: no copy when none
        # [N/16 column blocks][K/4][16 columns][4 k]: one 64-byte load feeds 16 columns x 4 k of VPDPBUSD
        self.packed = np.ascontiguousarray(wide.reshape(k // 4, 4, padded // 16, 16).transpose(2, 0, 3, 1))
        del wide
        self.corr = np.zeros(padded, np.int32)
        self.corr[:n] = ZERO_POINT * weight.sum(axis=0, dtype=np.int32)
        self.col_scale = np.zeros(padded, np.float32)
        self.col_scale[:n] = col_scale
        self._lib = load_library()

    def __call__(self, q: np.ndarray, row_scale: np.ndarray, out: np.ndarray, argmax: np.ndarray | None = None) -> np.ndarray:
        """Fill ``out [..., N]`` (float32, C-contiguous) from ``q [..., K]`` uint8 and ``row_scale [..., 1]``;
        with ``argmax`` (int32, one per row, at most ``MAX_ARGMAX_ROWS``) also each row's ``np.argmax``,
        found while the values are computed, or -1 for a row holding a NaN."""
        q = np.ascontiguousarray(q, np.uint8).reshape(-1, self.hidden)
        row_scale = np.ascontiguousarray(row_scale, np.float32).reshape(-1)
        rows = q.shape[0]
        if row_scale.shape[0] != rows or out.dtype != np.float32 or not out.flags.c_contiguous or out.size != rows * self.vocab:
            raise ValueError(f"LM head shapes: q {q.shape}, row_scale {row_scale.shape}, out {out.shape} {out.dtype}")
        if argmax is not None and (argmax.dtype != np.int32 or not argmax.flags.c_contiguous
                                   or argmax.size != rows or rows > MAX_ARGMAX_ROWS):
            raise ValueError(f"LM head argmax: {argmax.shape} {argmax.dtype} for {rows} rows (at most {MAX_ARGMAX_ROWS})")
        status = self._lib.toolkit_int8_head(q.ctypes.data, row_scale.ctypes.data, rows, self.hidden, self.vocab,
                                             self.packed.ctypes.data, self.corr.ctypes.data, self.col_scale.ctypes.data,
                                             out.ctypes.data, self.threads, None if argmax is None else argmax.ctypes.data)
        if status == -2:
            raise ValueError(f"LM head argmax: {rows} rows, the kernel holds at most {MAX_ARGMAX_ROWS}")
        if status == -3:
            raise MemoryError("the LM head kernel could not allocate its argmax state")
        return out


def reference_model(weight: np.ndarray, col_scale: np.ndarray):
    """The exported head's two ops alone as an ``onnx.ModelProto``: ``MatMulIntegerToFloat`` (activation
    scale 1, zero point 128) then ``Mul`` by the row scales; inputs ``q`` ``[m, K]`` uint8 and ``rs``
    ``[m, 1]``, output ``logits``. What the kernel is checked and timed against."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulIntegerToFloat", ["q", "w", "one", "cs", "zp"], ["u"], domain="com.microsoft"),
         helper.make_node("Mul", ["u", "rs"], ["logits"])], "lm_head",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, ["m", k]), helper.make_tensor_value_info("rs", TensorProto.FLOAT, ["m", 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(col_scale, "cs"), numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "zp")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def reference_session(weight: np.ndarray, col_scale: np.ndarray, threads: int = 1):
    """An onnxruntime session over ``reference_model``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(reference_model(weight, col_scale).SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class HeadSplit:
    """The graph outputs that replace ``logits`` and the head computing logits from them."""

    q_output: str
    scale_output: str
    head: Int8Head


@dataclass(frozen=True)
class RowwiseHead:
    """The graph's per-row int8 LM head: its two nodes, the row-scale tensor, and its constant inputs."""

    product: object  # MatMulIntegerToFloat(q, weight, a_scale, col_scale, zero_point)
    mul: object  # Mul(product, row_scale) -> logits
    row_scale: str
    weight: np.ndarray
    a_scale: np.ndarray
    col_scale: np.ndarray
    zero_point: np.ndarray


def rowwise_head(model, model_dir: Path) -> RowwiseHead | None:
    """``model``'s per-row int8 LM head (``MatMulIntegerToFloat`` then ``Mul`` producing ``logits``, its
    constants read from the initializers, external data from ``model_dir``), or None for another head."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    mul = producer.get("logits")
    if mul is None or mul.op_type != "Mul":
        return None
    initializers = {init.name: init for init in graph.initializer}
    for i, name in enumerate(mul.input):
        product = producer.get(name)
        if (product is not None and product.op_type == "MatMulIntegerToFloat" and len(product.input) == 5
                and all(c in initializers for c in product.input[1:])):
            constants = (numpy_helper.to_array(initializers[c], str(model_dir)) for c in product.input[1:])
            return RowwiseHead(product, mul, mul.input[1 - i], *constants)
    return None


def split_lm_head(model, model_dir: Path, threads: int) -> HeadSplit | None:
    """Take the per-row int8 LM head out of ``model`` (an ``onnx.ModelProto`` loaded without its external
    data, edited in place) and return what computes it instead; None, with ``model`` unchanged, where the
    kernel is unavailable (``unavailable_reason``, no compiler) or the head is not that pattern."""
    from onnx import TensorProto, helper

    reason = unavailable_reason()
    found = None if reason else rowwise_head(model, model_dir)
    if found is None:
        log.info("LM head stays in the graph: %s", reason or "not the per-row int8 pattern")
        return None
    weight, a_scale, col_scale, zero_point = found.weight, found.a_scale, found.col_scale, found.zero_point
    if (weight.dtype != np.int8 or weight.ndim != 2 or weight.shape[0] % 4 or a_scale.size != 1 or float(a_scale) != 1.0
            or zero_point.size != 1 or zero_point.dtype != np.uint8 or int(zero_point) != ZERO_POINT
            or col_scale.shape != (weight.shape[1],)):
        log.info("LM head stays in the graph: its int8 product is not the kernel's scheme")
        return None
    try:
        head = Int8Head(weight, col_scale.astype(np.float32), threads)
    except (RuntimeError, OSError) as exc:
        log.warning("LM head stays in the graph: the native kernel could not be built: %s", exc)
        return None
    graph, product, row_scale = model.graph, found.product, found.row_scale
    q_output = product.input[0]
    graph.node.remove(product)
    graph.node.remove(found.mul)
    logits = next(o for o in graph.output if o.name == "logits")
    dims = list(logits.type.tensor_type.shape.dim)[:-1]
    graph.output.remove(logits)
    shape = [d.dim_param or d.dim_value or None for d in dims]
    graph.output.extend([helper.make_tensor_value_info(q_output, TensorProto.UINT8, [*shape, weight.shape[0]]),
                         helper.make_tensor_value_info(row_scale, TensorProto.FLOAT, [*shape, 1])])
    used = {name for node in graph.node for name in node.input}
    dropped = set(product.input[1:]) - used  # the weights onnxruntime would otherwise read and prepack too
    for init in [init for init in graph.initializer if init.name in dropped]:
        graph.initializer.remove(init)
    return HeadSplit(q_output, row_scale, head)
