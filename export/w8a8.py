"""Per-row int8 activations x per-channel int8 weights for some of the gqa graph's layer linears.

onnxruntime-genai's builder gives every linear layer ``MatMulNBits`` (8 bits, block 32,
``accuracy_level=4``): each 32-wide block of an activation row and of a weight column carries its
own float scale, and the block products are summed in float. At the 16-128 rows of a batched decode
step or a prompt chunk that bookkeeping costs more than the multiplies: on an AVX-512 VNNI EPYC the
same shapes run 1.4-2x faster as ``toolkit.export.rowwise_int8`` (one scale per activation row, one
per weight column, MLAS's int8 GEMM).

One scale for a whole activation row is coarser than one per 32 channels, so not every linear
takes it. Measured on the default model (Gemma 3 270M, ``toolkit validate``; the builder's
``MatMulNBits`` head-to-head: top-1 0.980, min cosine 0.99617), each group converted alone,
SmoothQuant alpha 0.75, weights from the checkpoint:

- ``o_proj``: top-1 0.977, cosine 0.99898; ``gate_proj`` + ``up_proj``: 0.969, 0.99847;
- ``qkv_proj``: 0.973, cosine **0.98789**; ``down_proj``: 0.941, cosine **0.99206** (the input of
  ``down_proj`` is ``gelu(gate) * up``, the most outlier-heavy activation of the layer).

So ``CONVERTED`` is ``o_proj``, ``gate_proj`` and ``up_proj`` (60 % of a layer's weights). With alpha
0.5 and the previous ``DynamicQuantizeMatMul`` head they scored top-1 0.988, greedy 0.859, min cosine
0.99818, max-abs 0.89 (the builder's layers: 0.980, 0.680, 0.99617, 1.26), helped by weights read from
the checkpoint's fp32 tensors (``checkpoint_weight``) instead of quantized twice; the exported
default engine, with the per-row head as well: 0.977, 0.766, 0.99587, 0.99.

Smoothing (SmoothQuant, https://arxiv.org/abs/2211.10438) moves activation outliers into the weights
where an RMSNorm feeds only converted linears (``gate_proj`` + ``up_proj`` read
``pre_feedforward_layernorm``): channel k of the norm's scale is divided by s_k and row k of the
linears' weights multiplied by it, an exact rewrite, with ``s_k = amax_k^alpha / wmax_k^(1-alpha)``
from activation maxima on a calibration prefill (``lm_head_quant.CALIBRATION_TEXT``). ``o_proj``
reads the attention output directly and is quantized per row without smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.export import rowwise_int8
from toolkit.export.lm_head_quant import NORMS, activation_maxima, save_in_place, smoothing_scales, tensor_uses

LINEAR_OP = "MatMulNBits"
SMOOTH_ALPHA = 0.5
CONVERTED = ("attn/o_proj", "mlp/gate_proj", "mlp/up_proj")
# builder node "/model/layers.N/<block>/<linear>/MatMul_Q8" -> the Hugging Face weights it was built from
CHECKPOINT_NAMES = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_proj": ("mlp.gate_proj",),
    "mlp/up_proj": ("mlp.up_proj",),
    "mlp/down_proj": ("mlp.down_proj",),
}


@dataclass
class Linear:
    """One of the builder's ``MatMulNBits`` nodes, with the fp32 ``[K, N]`` weight to quantize."""

    node: object
    weight: np.ndarray
    from_checkpoint: bool = False


def node_kind(name: str) -> str | None:
    """``"<block>/<linear>"`` of a builder layer linear's node name, None for anything else."""
    parts = name.split("/")
    if len(parts) != 6 or not parts[2].startswith("layers."):
        return None
    return f"{parts[3]}/{parts[4]}"


def dequantize_nbits(node, inits: dict, base_dir: str = "") -> np.ndarray:
    """The fp32 ``[K, N]`` weight of a symmetric 8-bit ``MatMulNBits`` node (zero point 128 implied)."""
    from onnx import numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("bits") != 8 or len(node.input) > 3:
        raise ValueError(f"{node.name}: only the builder's symmetric 8-bit MatMulNBits is re-quantized")
    n, k = attrs["N"], attrs["K"]
    q = numpy_helper.to_array(inits[node.input[1]], base_dir).astype(np.float32) - rowwise_int8.ZERO_POINT
    scales = numpy_helper.to_array(inits[node.input[2]], base_dir).reshape(n, -1)
    return np.ascontiguousarray((q * scales[..., None]).reshape(n, k).T)


def checkpoint_weight(node, tensors, dequantized: np.ndarray, step: float) -> np.ndarray:
    """The fp32 ``[K, N]`` weight ``node`` was built from, read through ``tensors`` (``name -> array``,
    e.g. a safetensors handle's ``get_tensor``), or ``dequantized`` when the names do not map or the
    values are not what the builder quantized (further than one quantization ``step`` from it: the
    builder's rounding plus its clipping of a block's extreme value)."""
    layer = node.name.split("/")[2]
    names = CHECKPOINT_NAMES.get(node_kind(node.name) or "")
    if names is None or tensors is None:
        return dequantized
    try:
        parts = [np.asarray(tensors(f"model.{layer}.{name}.weight"), np.float32) for name in names]
    except KeyError:
        return dequantized
    weight = np.concatenate(parts, axis=0).T
    if weight.shape != dequantized.shape or np.abs(weight - dequantized).max() > step * 1.001:
        return dequantized
    return np.ascontiguousarray(weight)


def find_linears(model, kinds: tuple[str, ...] = CONVERTED, tensors=None, base_dir: str = "") -> dict[str, Linear]:
    """The builder's 8-bit layer linears of ``kinds``, by node name, with the checkpoint's fp32 weights
    where ``tensors`` has them (``checkpoint_weight``), else their dequantized values."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    linears = {}
    for node in model.graph.node:
        if node.op_type != LINEAR_OP or node_kind(node.name) not in kinds:
            continue
        dequantized = dequantize_nbits(node, inits, base_dir)
        step = float(numpy_helper.to_array(inits[node.input[2]], base_dir).max())
        weight = checkpoint_weight(node, tensors, dequantized, step)
        linears[node.name] = Linear(node, weight, from_checkpoint=weight is not dequantized)
    return linears


def smoothable(graph, linears: dict[str, Linear]) -> dict[str, tuple[str, list[Linear]]]:
    """Activation -> (the RMSNorm scale initializer producing it, its readers) where the tensor is a
    norm's normalized output read by converted linears only (module doc)."""
    producers, readers, outputs = tensor_uses(graph)
    groups: dict[str, list[Linear]] = {}
    for linear in linears.values():
        groups.setdefault(linear.node.input[0], []).append(linear)
    found = {}
    for tensor, group in groups.items():
        norm = producers.get(tensor)
        if (norm is not None and norm.op_type in NORMS and norm.output[0] == tensor
                and tensor not in outputs and readers.get(tensor) == len(group)):
            found[tensor] = (norm.input[NORMS[norm.op_type]], group)
    return found


def smooth(graph, linears: dict[str, Linear], act_max: dict[str, np.ndarray], alpha: float) -> list[str]:
    """Fold SmoothQuant scales into the norms and their readers' weights (in place); the tensors smoothed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    done = []
    for tensor, (norm_scale, group) in smoothable(graph, linears).items():
        scales = smoothing_scales(act_max[tensor], np.concatenate([r.weight.T for r in group]), alpha)
        for reader in group:
            reader.weight = reader.weight * scales[:, None]
        init = inits[norm_scale]
        init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) / scales).astype(np.float32), norm_scale))
        done.append(tensor)
    return done


def replace_linears(graph, linears: dict[str, Linear]) -> None:
    """Swap every linear in ``linears`` for the per-row int8 subgraph, one activation quantization per input."""
    old = {name for linear in linears.values() for name in linear.node.input[1:]}
    keep = [init for init in graph.initializer if init.name not in old]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    rowwise_int8.add_constants(graph)
    quantized: dict[str, tuple[str, str]] = {}
    nodes = []
    for node in graph.node:
        linear = linears.get(node.name)
        if linear is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            act_nodes, q, scale = rowwise_int8.activation_nodes(x)
            nodes += act_nodes
            quantized[x] = (q, scale)
        prefix = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
        nodes += rowwise_int8.linear_nodes(graph, node.name, *quantized[x], linear.weight, node.output[0], prefix)
    del graph.node[:]
    graph.node.extend(nodes)


def requantize_engine_body(model_path: Path, token_ids: list[int], alpha: float | None = SMOOTH_ALPHA,
                           tensors=None, kinds: tuple[str, ...] = CONVERTED) -> dict:
    """Rewrite ``model_path`` (and its external data) with the layer linears of ``kinds`` per-row int8.

    ``token_ids``: the calibration prefill for smoothing (``alpha`` None: none); ``tensors``: the
    checkpoint's weights by name (``find_linears``). Returns the manifest's description.
    """
    import onnx

    model = onnx.load(str(model_path))
    linears = find_linears(model, kinds, tensors)
    if not linears:
        raise ValueError("the graph has none of the builder's 8-bit layer linears to convert")
    smoothed: list[str] = []
    if alpha is not None:
        tensors_to_smooth = list(smoothable(model.graph, linears))
        if tensors_to_smooth:
            smoothed = smooth(model.graph, linears, activation_maxima(model_path, tensors_to_smooth, token_ids), alpha)
    replace_linears(model.graph, linears)
    save_in_place(model, model_path)
    return {"method": "MatMulIntegerToFloat", "linears": list(kinds), "weights": "per-channel int8",
            "activations": "per-row int8", "smooth_alpha": alpha, "smoothed": len(smoothed),
            "from_checkpoint": sum(linear.from_checkpoint for linear in linears.values()), "converted": len(linears)}
