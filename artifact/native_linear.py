"""The int8 graphs' layer products on our own onnxruntime custom operators (``artifact/native/int8_linear.c``).

At 16 decode rows on 2 Zen 4 cores (``benchmarks/op_profile.py``), onnxruntime spent ~4.8 ms of a ~30 ms
step in the layers' per-row ``MatMulIntegerToFloat`` products, ~2.3 ms in the nine small nodes that
quantize their inputs (``toolkit.export.rowwise_int8.activation_nodes``), and ~6.5 ms in the 8-bit
``MatMulNBits`` products (~100 G multiply-adds a second), while the LM head's VNNI tiles
(``toolkit.runtime.native_head``) ran ~300 G/s on the same cores. ``swap_linears`` puts both kinds on
those tiles, in memory (the engine directory is not touched):

- **the per-row int8 linear** (``Abs`` … ``Cast`` quantizing ``x``, ``MatMulIntegerToFloat``, ``Mul`` by the
  row scale) becomes one ``RowwiseInt8MatMul(x, w, col_scale)``, whose output is bitwise the graph's:
  the same float operations in the same order, the integer sum exact;
- **``MatMulNBits``** with 8 bits, blocks of 32, no zero points (128) and ``accuracy_level`` 4 becomes
  ``Int8BlockMatMul`` over the same initializers: the same int8 quantization of ``x`` per block, exact
  integer block sums, a float sum in our order, so the output agrees with onnxruntime's to float
  rounding, not bitwise (tests/test_native_linear.py; ``toolkit validate`` measures the engine).

Both compute each row with the same instructions whatever the rows beside it, so a token's logits stay
bitwise the same alone, batched, in a prompt chunk or in a speculative draft being verified.

Built on first use (``toolkit.artifact.native_build``) and used by the serving runner
(``toolkit.runtime.gqa_runner``) and ``toolkit validate`` (``toolkit.export.ort_runner``) alike, only where
``$TOOLKIT_NATIVE_LINEAR`` is not ``0``, the CPU has AVX-512 (F, BW) and AVX-512 VNNI (on AVX2 CPUs MLAS's
u8s8 kernel sums pairs in 16 bits and can saturate, so the per-row products would not be the graph's),
and a C compiler builds the source; any node of another form keeps onnxruntime's operator.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from toolkit.artifact import native_build
from toolkit.artifact.native_build import build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "int8_linear.c"
ENV_SWITCH = "TOOLKIT_NATIVE_LINEAR"
DOMAIN = "toolkit.native.linear"  # the domain RegisterCustomOps adds in the C source
ROWWISE_OP, BLOCK_OP = "RowwiseInt8MatMul", "Int8BlockMatMul"
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
# as the LM head kernel's (runtime/native_head.py): GCC keeps the tiles' accumulators in registers with these
CFLAGS = ("-O2", "-fno-tree-pre", "-fno-gcse", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fPIC", "-shared", "-pthread")
BLOCK_K = 32  # Int8BlockMatMul's block (BLOCK_K in the C source)


def unavailable_reason(flags: frozenset[str] | None = None) -> str | None:
    """Why the operators cannot run here (``toolkit.artifact.native_build.unavailable_reason``), or None."""
    return native_build.unavailable_reason(ENV_SWITCH, REQUIRED_CPU_FLAGS, flags)


def library() -> Path:
    """The operators' shared library, built if needed (raises ``RuntimeError`` where it cannot be)."""
    return build_library(SOURCE, CFLAGS)


def available() -> bool:
    """Whether the operators can run here: nothing in ``unavailable_reason`` and the library builds."""
    return unavailable_reason() is None and native_build.build_error(library) is None


class _Graph:
    """The lookups the pattern matching needs: producers, consumers, small constant initializers."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str, limit: int = 16) -> np.ndarray | None:
        """An initializer of at most ``limit`` elements held in the graph (not external data), or None."""
        from onnx import numpy_helper

        init = self.initializers.get(name)
        if init is None or int(np.prod(init.dims, dtype=np.int64)) > limit or init.data_location == 1:
            return None
        return numpy_helper.to_array(init)

    def is_constant(self, name: str, value: float) -> bool:
        found = self.constant(name)
        return found is not None and found.size == 1 and float(found.reshape(())) == value

    def made_by(self, name: str, op: str):
        """The node producing ``name`` if it is an ``op`` of the default domain, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _quantized_input(g: _Graph, q: str, row_scale: str) -> str | None:
    """The float input ``x`` that ``q`` and ``row_scale`` quantize per row (``rowwise_int8.activation_nodes``:
    s = max(ReduceMax(Abs(x), [-1]), 1e-12) / 127; q = Cast<uint8>(Round(x / s) + 128)), or None."""
    from onnx import TensorProto

    cast = g.made_by(q, "Cast")
    if cast is None or _attributes(cast).get("to") != TensorProto.UINT8:
        return None
    add = g.made_by(cast.input[0], "Add")
    if add is None or not g.is_constant(add.input[1], 128.0):
        return None
    rounded = g.made_by(add.input[0], "Round")
    divided = rounded and g.made_by(rounded.input[0], "Div")
    if divided is None or divided.input[1] != row_scale:
        return None
    x = divided.input[0]
    scale = g.made_by(row_scale, "Div")
    floor = scale and g.is_constant(scale.input[1], 127.0) and g.made_by(scale.input[0], "Max")
    if not floor or not g.is_constant(floor.input[1], np.float32(1e-12)):
        return None
    reduce = g.made_by(floor.input[0], "ReduceMax")
    if reduce is None or _attributes(reduce).get("keepdims", 1) != 1:
        return None
    axes = g.constant(reduce.input[1]) if len(reduce.input) > 1 and reduce.input[1] else _attributes(reduce).get("axes")
    if axes is None or list(np.asarray(axes).reshape(-1)) != [-1]:
        return None
    absolute = g.made_by(reduce.input[0], "Abs")
    return x if absolute is not None and absolute.input[0] == x else None


def _rowwise(g: _Graph, node):
    """(x, weight, col_scale, the Mul by the row scale, the row scale) for a per-row int8 ``MatMulIntegerToFloat``, or None."""
    if len(node.input) != 5 or len(node.output) != 1:
        return None
    q, weight, a_scale, col_scale, zero_point = node.input
    w = g.initializers.get(weight)
    if (w is None or len(w.dims) != 2 or w.dims[0] % 4 or w.data_type != 3  # TensorProto.INT8
            or not g.is_constant(a_scale, 1.0) or not g.is_constant(zero_point, 128)):
        return None
    scales = g.initializers.get(col_scale)
    if scales is None or list(scales.dims) not in ([w.dims[1]],) or scales.data_type != 1:  # FLOAT [N]
        return None
    users = g.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Mul" or node.output[0] in g.outputs:
        return None
    mul = users[0]
    row_scale = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
    x = _quantized_input(g, q, row_scale)
    return None if x is None else (x, weight, col_scale, mul, row_scale)


def _block(g: _Graph, node) -> bool:
    """Whether a ``MatMulNBits`` node is the form ``Int8BlockMatMul`` computes."""
    attrs = _attributes(node)
    k, n = attrs.get("K", 0), attrs.get("N", 0)
    if (attrs.get("bits") != 8 or attrs.get("block_size") != BLOCK_K or attrs.get("accuracy_level") != 4
            or k <= 0 or k % BLOCK_K or n <= 0 or len(node.input) < 3 or any(node.input[3:])):
        return False
    b, scales = g.initializers.get(node.input[1]), g.initializers.get(node.input[2])
    return (b is not None and scales is not None and b.data_type == 2  # UINT8
            and int(np.prod(b.dims)) == n * k and int(np.prod(scales.dims)) == n * (k // BLOCK_K) and scales.data_type == 1)


def _drop_dead(graph, candidates: list, gone: list) -> None:
    """Remove the ``candidates`` (nodes) whose outputs nothing reads any more, until none is left, and
    the initializers that they or the ``gone`` nodes (removed already) read and nothing reads now."""
    candidate_outputs = {tuple(n.output) for n in candidates}
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if tuple(n.output) not in candidate_outputs or any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        kept = [n.SerializeToString() for n in keep]  # the container's elements cannot be removed by identity
        del graph.node[:]
        for data in kept:
            graph.node.add().ParseFromString(data)
    read = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in read
              and any(init.name in n.input for n in [*candidates, *gone])]
    for init in unused:
        graph.initializer.remove(init)


def swap_linears(model) -> int:
    """Put ``model``'s per-row int8 linears and 8-bit ``MatMulNBits`` (an ``onnx.ModelProto``, edited in
    place) on our operators; how many nodes now run on them (0: ``model`` unchanged, where the operators
    are unavailable or no node has a form they compute)."""
    from onnx import helper

    reason = unavailable_reason()
    if reason is None and (failure := native_build.build_error(library)):
        reason = f"the operators could not be built: {failure}"
    if reason is not None:
        log.info("the int8 products stay on onnxruntime's operators: %s", reason)
        return 0
    graph = model.graph
    g = _Graph(graph)
    swapped, removed, gone = 0, [], []
    for node in list(graph.node):
        if node.domain != "com.microsoft":
            continue
        if node.op_type == "MatMulIntegerToFloat" and (found := _rowwise(g, node)) is not None:
            x, weight, col_scale, mul, row_scale = found
            fused = helper.make_node(ROWWISE_OP, [x, weight, col_scale], [mul.output[0]], name=f"{node.name}/toolkit", domain=DOMAIN)
            graph.node.insert(list(graph.node).index(node), fused)
            graph.node.remove(node)
            graph.node.remove(mul)
            removed += [g.producer[name] for name in _chain(g, node.input[0], row_scale)]
            gone += [node, mul]
            swapped += 1
        elif node.op_type == "MatMulNBits" and _block(g, node):
            node.op_type, node.domain = BLOCK_OP, DOMAIN
            del node.input[3:]
            swapped += 1
    if not swapped:
        log.info("the int8 products stay on onnxruntime's operators: no node of a form ours compute")
        return 0
    _drop_dead(graph, removed, gone)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return swapped


def _chain(g: _Graph, q: str, row_scale: str) -> list[str]:
    """The outputs of the nodes quantizing a per-row linear's input (``_quantized_input``'s chain), from
    ``q`` and ``row_scale`` back to ``Abs``: candidates for removal once nothing reads them."""
    names, frontier = [], [q, row_scale]
    while frontier:
        name = frontier.pop()
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Cast", "Add", "Round", "Div", "Max", "ReduceMax", "Abs") or name in names:
            continue
        names.append(name)
        frontier += [i for i in node.input if i in g.producer]
    return names


def uses_operators(model) -> bool:
    """Whether ``model`` holds a node of our operators' domain (its session must register the library)."""
    return any(n.domain == DOMAIN for n in model.graph.node)
