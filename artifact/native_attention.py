"""The GQA graphs' attention on our own onnxruntime custom operator (``artifact/native/gqa_attention.c``).

onnxruntime's CPU ``GroupQueryAttention`` runs one GEMM per (row, query head) over the whole cache
capacity, so a row's cached keys and values are read once per query head and a probability matrix as
wide as the capacity is written and read back. On the default model (4 query heads over 1 key/value
head) it took 8.3 ms of a 34 ms 16-row decode step at ~170 cached tokens. Our operator computes the
query heads that share a key/value head in one pass over that head's live positions; same inputs,
outputs and attributes, so ``swap_attention`` only re-points each node at our domain, in memory (the
engine directory is not touched). onnxruntime's own node is the reference it is tested against
(tests/test_native_attention.py, and the whole graph in tests/test_gqa.py); ``toolkit validate`` runs
the graph as served, ours included, against the fp32 reference outputs.

On quantized engines the cache is float16 (``cache_dtype``; ``GroupQueryAttentionF16Cache`` in the C
source): the step streams the live cache from memory, and half the bytes measured ~7-14 % more tokens
per second at 16 streams, with the engine still passing its validation bars.

A row's attention output is bitwise the same whether its tokens come one per step, as a prompt chunk
or as a speculative draft being verified (every (query, key) product is one instruction sequence),
which onnxruntime's operator does not give: its ``S > 1`` path is another GEMM shape.

It is built on first use (``toolkit.artifact.native_build``), used by the serving engine
(``toolkit.runtime.gqa_runner``) and by ``toolkit validate`` (``toolkit.export.ort_runner``) alike,
and only where all of these hold; otherwise the graph keeps onnxruntime's operator:

- ``$TOOLKIT_NATIVE_ATTENTION`` is not ``0``;
- the machine is x86-64 and the CPU reports ``avx512f`` (the kernel's intrinsics);
- a C compiler builds the source;
- every ``GroupQueryAttention`` node has one of the builder's forms: query, key, value (or the three
  packed in the query), past key and value, ``seqlens_k``, ``total_sequence_length``, cos and sin
  caches, nothing after them, no interleaved rotary or smooth softmax, a head size that is a multiple
  of 16 (at most 512) with the rotary tables half as wide, and at most 16 query heads per key/value head;
- for a float16 cache, the past key/value are graph inputs that only the attention reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from toolkit.artifact import native_build
from toolkit.artifact.native_build import build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "gqa_attention.c"
ENV_SWITCH = "TOOLKIT_NATIVE_ATTENTION"
CACHE_ENV = "TOOLKIT_KV_CACHE_DTYPE"  # float16 | float32: overrides ``cache_dtype``'s choice
F16_CACHE_OP = "GroupQueryAttentionF16Cache"  # the operator over a float16 cache, in the C source
DOMAIN = "toolkit.native"  # the domain RegisterCustomOps adds in the C source
REQUIRED_CPU_FLAGS = frozenset({"avx512f"})
CFLAGS = ("-O2", "-mavx512f", "-fPIC", "-shared")
INPUTS = 9  # query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache
ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "local_window_size", "softcap", "do_rotary", "rotary_interleaved",
              "smooth_softmax"}
MAX_HEAD, MAX_GROUP = 512, 16  # MAX_HEAD and MAX_GROUP in the C source


def unavailable_reason(flags: frozenset[str] | None = None) -> str | None:
    """Why the operator cannot run here (``toolkit.artifact.native_build.unavailable_reason``), or None."""
    return native_build.unavailable_reason(ENV_SWITCH, REQUIRED_CPU_FLAGS, flags)


def library() -> Path:
    """The operator's shared library, built if needed (raises ``RuntimeError`` where it cannot be)."""
    return build_library(SOURCE, CFLAGS)


def available() -> bool:
    """Whether the operator can run here: nothing in ``unavailable_reason`` and the library builds."""
    return unavailable_reason() is None and native_build.build_error(library) is None


def _unsupported(node, initializers: dict, head_size: int) -> str | None:
    """Why ``node`` (a GroupQueryAttention) is not a form our operator computes, or None."""
    from onnx import helper

    inputs = list(node.input)
    packed = len(inputs) >= INPUTS and not inputs[1] and not inputs[2]  # query, key and value in one input
    if len(inputs) < INPUTS or not all(inputs[i] for i in range(INPUTS) if not (packed and i in (1, 2))) or any(inputs[INPUTS:]):
        return f"inputs {inputs}"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if set(attrs) - ATTRIBUTES:
        return f"attributes {sorted(set(attrs) - ATTRIBUTES)}"
    if attrs.get("rotary_interleaved", 0) or attrs.get("smooth_softmax", 0):
        return "interleaved rotary or smooth softmax"
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if kv_heads <= 0 or heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return f"{heads} query heads over {kv_heads} key/value heads"
    if head_size % 16 or not 0 < head_size <= MAX_HEAD:
        return f"head size {head_size}"
    if attrs.get("do_rotary", 0) not in (0, 1):
        return f"do_rotary={attrs['do_rotary']}"
    if attrs.get("do_rotary", 0):
        tables = [initializers.get(name) for name in inputs[7:9]]
        if any(t is None or len(t.dims) != 2 or t.dims[1] * 2 != head_size for t in tables):
            return "rotary tables that are not [positions, head size / 2] initializers"
    return None


def cache_dtype(precision: str) -> str:
    """The KV cache's element type on our operator for an engine of ``precision``: float16 for quantized
    engines (llama.cpp's default cache type too; half the bytes the attention reads each step, half the
    memory per token), float32 for fp32 engines, which stay the exact reference. ``$TOOLKIT_KV_CACHE_DTYPE``
    (``float16`` / ``float32``) overrides it."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen:
        if chosen not in ("float16", "float32"):
            raise ValueError(f"${CACHE_ENV}={chosen!r}: use float16 or float32")
        return chosen
    return "float32" if precision == "fp32" else "float16"


def serves(model_path: Path, cache: str = "float32") -> bool:
    """Whether ``swap_attention`` puts the graph at ``model_path`` on our operator here, over a ``cache``
    cache (its graph is read, not its weights): what a verify run's bitwise identity with plain decoding
    rests on (``toolkit.runtime.speculative.SpeculativeConfig.for_precision``), and the cache's size."""
    import onnx

    from toolkit.artifact.layout import head_size

    model = onnx.load(str(model_path), load_external_data=False)
    return swap_attention(model, head_size(model, model_path), cache)


def swap_attention(model, head_size: int, cache: str = "float32") -> bool:
    """Re-point every ``GroupQueryAttention`` of ``model`` (an ``onnx.ModelProto``, edited in place) at our
    operator; False, with ``model`` unchanged, where the operator is unavailable or a node is another form.

    ``head_size``: the graph's attention head size (``toolkit.artifact.layout.kv_spec``). ``cache``
    ``"float16"``: the nodes' past key/value inputs (graph inputs, read by nothing else) and present
    outputs become float16 and the nodes our operator over a float16 cache (``cache_dtype``); the
    runner's buffers follow the graph's types.
    """
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    reason = unavailable_reason() if nodes else "the graph has no GroupQueryAttention"
    if reason is None:
        initializers = {init.name: init for init in model.graph.initializer}
        reason = next((f"{n.name}: {why}" for n in nodes if (why := _unsupported(n, initializers, head_size))), None)
    cache_names = set()
    if reason is None and cache == "float16":
        cache_names = {name for n in nodes for name in (*n.input[3:5], *n.output[1:3])}
        graph_inputs = {i.name for i in model.graph.input}
        attention = {id(n) for n in nodes}
        if (not {name for n in nodes for name in n.input[3:5]} <= graph_inputs
                or any(name in cache_names for n in model.graph.node if id(n) not in attention for name in n.input)):
            reason = "the cache is not graph inputs fed to the attention alone (a float16 cache needs that)"
    elif cache != "float32":
        reason = reason or f"cache element type {cache!r}"
    if reason is None and (failure := native_build.build_error(library)):
        reason = f"the operator could not be built: {failure}"
    if reason is not None:
        log.info("attention stays on onnxruntime's GroupQueryAttention: %s", reason)
        return False
    for node in nodes:
        node.domain = DOMAIN
        del node.input[INPUTS:]
        if cache == "float16":
            node.op_type = F16_CACHE_OP
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.name in cache_names:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return True


def uses_operator(model) -> bool:
    """Whether ``model`` holds a node of our operator's domain (its session must register the library)."""
    return any(n.domain == DOMAIN for n in model.graph.node)
