"""Re-quantize the gqa graph's LM head (``/lm_head/MatMul_Q8``) with another int8 scheme.

onnxruntime-genai's builder quantizes every MatMul with one scheme; the LM head (vocabulary x
hidden, 262,144 x 640 on the default model) is a third of a batched decode step's kernel time
(``benchmarks/op_profile.py``), so it gets its own scheme here, from the fp32 weights (the tied
embedding table when the graph keeps one, else the dequantized builder weights):

- ``nbits``: ``MatMulNBits`` (https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits)
  with the given bits / block size / accuracy level; symmetric, zero point implied (2^(bits-1)).
- ``rowwise``: ``toolkit.export.rowwise_int8`` (one activation scale per row, computed in the graph,
  int8 weights with one scale per output column, ``MatMulIntegerToFloat``): a row's logits depend on
  that row only, whatever the batch, at a few per cent more time than ``dqmm`` at 16-64 rows. The
  gqa int8 export's scheme.
- ``dqmm``: ``DynamicQuantizeMatMul`` (activations quantized to uint8 per tensor at run time, int8
  weights with one scale per output column), which runs on MLAS's prepacked int8 GEMM (VNNI):
  measured 20-25 % less CPU per decode step than the builder's 8-bit ``MatMulNBits`` at 16-64
  rows on an AVX-512 VNNI EPYC. One activation scale for a whole hidden vector loses too much on
  Gemma's outlier channels (teacher-forced top-1 0.957, cosine 0.9943 < the 0.995 bar), so the
  head is smoothed first (SmoothQuant, https://arxiv.org/abs/2211.10438): channel k of the final
  norm's scale is divided by s_k and column k of the head multiplied by it, an exact rewrite,
  with s_k = amax_k^alpha / wmax_k^(1-alpha) from activation maxima on a fixed calibration text
  (not the golden prompts). With alpha 0.5 the default model scores top-1 0.977, cosine 0.9972.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LM_HEAD_NODE = "/lm_head/MatMul_Q8"
EMBEDDING_NODE = "/model/embed_tokens/Gather"
NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> index of its scale input
PASS_THROUGH = {"Gather", "Unsqueeze", "Squeeze", "Reshape", "Slice"}  # the builder's LM-head pruning
SMOOTH_ALPHA = 0.5
# Calibration for the smoothing scales: prose, code, numbers and chat turns; not the golden prompts.
CALIBRATION_TEXT = (
    "The museum opened its new wing in the spring of 1998, and the first exhibition showed maps drawn by "
    "sailors who had never seen the coasts they described. Visitors walked past glass cases of compasses, "
    "letters and ship logs while a guide explained how trade winds shaped the routes across the Atlantic.\n\n"
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n\n"
    "Quarterly revenue rose 12.5% to $4,310 million; operating margin was 18.2%, up from 16.9%. "
    "In 2023 the plant produced 1,245,000 units at 98.7% yield.\n\n"
    "User: Can you explain why the sky is blue in two sentences?\nAssistant: Sunlight scatters off the "
    "molecules of the air, and short blue wavelengths scatter far more than red ones. Wherever you look "
    "away from the sun, you see that scattered blue light.\n"
    "Die Katze schläft auf dem Sofa. Le chat dort sur le canapé. El gato duerme en el sofá.\n"
)


@dataclass(frozen=True)
class HeadScheme:
    """How to quantize the LM head: ``nbits`` (bits, block_size, accuracy_level), ``dqmm`` or ``rowwise``."""

    method: str = "nbits"
    bits: int = 8
    block_size: int = 32
    accuracy_level: int = 4
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: no smoothing

    def options(self) -> dict:
        """The manifest's description of this scheme."""
        if self.method == "dqmm":
            return {"method": "DynamicQuantizeMatMul", "bits": 8, "weights": "per-channel", "smooth_alpha": self.smooth_alpha}
        if self.method == "rowwise":
            return {"method": "MatMulIntegerToFloat", "bits": 8, "weights": "per-channel", "activations": "per-row",
                    "smooth_alpha": self.smooth_alpha}
        return {"method": "MatMulNBits", "bits": self.bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level}


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of ``weight`` ``[N, K]`` in MatMulNBits' layout.

    Returns (``uint8 [N, K/block, block*bits/8]``, ``float32 [N, K/block]``); the stored value is
    ``q + 2^(bits-1)`` (MatMulNBits' default zero point), 4-bit values packed low nibble first.
    """
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block size {block_size}")
    blocks = weight.reshape(n, k // block_size, block_size).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scales.astype(np.float32)


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output row of ``weight`` ``[N, K]``: (``int8 [K, N]``, ``float32 [N]``)."""
    from toolkit.export.rowwise_int8 import quantize_columns

    q, scales = quantize_columns(np.ascontiguousarray(weight.T))
    return np.ascontiguousarray(q), scales


def _initializers(graph) -> dict:
    return {i.name: i for i in graph.initializer}


def head_weight(model, base_dir: str = "") -> np.ndarray:
    """The LM head's fp32 ``[vocab, hidden]`` weights: the embedding table if it is the same matrix, else dequantized."""
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    node = next(n for n in graph.node if n.name == LM_HEAD_NODE)
    attrs = {a.name: a.i for a in node.attribute}
    q = numpy_helper.to_array(inits[node.input[1]], base_dir)
    scales = numpy_helper.to_array(inits[node.input[2]], base_dir).reshape(attrs["N"], -1)
    if attrs["bits"] != 8 or len(node.input) > 3:
        raise ValueError("only the builder's symmetric 8-bit LM head is re-quantized")
    dequantized = ((q.astype(np.float32) - 128) * scales[..., None]).reshape(attrs["N"], attrs["K"])
    embedding = next((n for n in graph.node if n.name == EMBEDDING_NODE), None)
    if embedding is not None and embedding.input[0] in inits:
        table = numpy_helper.to_array(inits[embedding.input[0]], base_dir)
        # tied (Gemma): the table is the exact source of the builder's 8-bit weights
        if table.shape == dequantized.shape and np.abs(table - dequantized).max() <= scales.max() * 0.5 + 1e-6:
            return table.astype(np.float32)
    return dequantized


def requantize_lm_head(model, scheme: HeadScheme, base_dir: str = "", weight: np.ndarray | None = None) -> None:
    """Replace ``model``'s LM head node (in place) with ``scheme``, fed the same input, writing ``logits``.

    ``base_dir``: where external data lives when ``model`` was loaded without it; ``weight``: the
    fp32 ``[vocab, hidden]`` matrix to quantize (default: ``head_weight``).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weight = head_weight(model, base_dir) if weight is None else weight
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == LM_HEAD_NODE)
    vocab, hidden = weight.shape
    old = set(node.input[1:])
    keep = [init for init in graph.initializer if init.name not in old]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if scheme.method == "nbits":
        q, scales = quantize_blockwise(weight, scheme.bits, scheme.block_size)
        names = [f"lm_head.MatMul.weight_Q{scheme.bits}G{scheme.block_size}", "lm_head.MatMul.weight_scales"]
        graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scales, names[1])])
        new = [helper.make_node(
            "MatMulNBits", [node.input[0], *names], list(node.output), name=LM_HEAD_NODE, domain="com.microsoft",
            K=hidden, N=vocab, bits=scheme.bits, block_size=scheme.block_size, accuracy_level=scheme.accuracy_level,
        )]
    elif scheme.method == "dqmm":
        q, scales = quantize_per_channel(weight)
        names = ["lm_head.MatMul.weight_i8", "lm_head.MatMul.weight_scale", "lm_head.MatMul.weight_zero_point"]
        graph.initializer.extend([
            numpy_helper.from_array(q, names[0]),
            numpy_helper.from_array(scales, names[1]),
            numpy_helper.from_array(np.zeros(vocab, np.int8), names[2]),
        ])
        new = [helper.make_node("DynamicQuantizeMatMul", [node.input[0], *names], list(node.output),
                                name=LM_HEAD_NODE, domain="com.microsoft")]
    elif scheme.method == "rowwise":
        from toolkit.export import rowwise_int8

        rowwise_int8.add_constants(graph)
        act_nodes, q, row_scale = rowwise_int8.activation_nodes(node.input[0])
        new = act_nodes + rowwise_int8.linear_nodes(graph, LM_HEAD_NODE, q, row_scale, np.ascontiguousarray(weight.T),
                                                    node.output[0], "lm_head.MatMul")
    else:
        raise ValueError(f"unknown LM head scheme {scheme.method!r}")
    graph.node.remove(node)
    for offset, added in enumerate(new):
        graph.node.insert(index + offset, added)


# ---- smoothing -----------------------------------------------------------------------------------
def tensor_uses(graph) -> tuple[dict, dict[str, int], set[str]]:
    """(tensor -> the node producing it, tensor -> how many node inputs read it, the graph's output names):
    what tells whether rescaling a tensor changes anything but its intended readers."""
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return producers, uses, {o.name for o in graph.output}


def final_norm(graph) -> tuple[object, str] | None:
    """The RMSNorm feeding the LM head through pruning ops only, and its scale initializer's name.

    None unless every tensor on the way (the norm's output included) feeds nothing else, so that
    rescaling the norm changes the LM head's input only.
    """
    producers, uses, outputs = tensor_uses(graph)
    head = next(n for n in graph.node if n.name == LM_HEAD_NODE)
    name = head.input[0]
    while name in producers and uses.get(name) == 1 and name not in outputs:
        node = producers[name]
        if node.op_type in NORMS:
            return (node, node.input[NORMS[node.op_type]]) if name == node.output[0] else None
        if node.op_type not in PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def activation_maxima(model_path: Path, tensors: list[str], token_ids: list[int]) -> dict[str, np.ndarray]:
    """Per-channel max |activation| of each of ``tensors`` over every position of one prefill of ``token_ids``.

    Runs a copy of the graph (written beside ``model_path``, sharing its external data, removed
    afterwards) with ``tensors`` as extra outputs.
    """
    import onnx
    import onnxruntime as ort

    from toolkit.artifact.layout import kv_spec

    model = onnx.load(str(model_path), load_external_data=False)
    for name in tensors:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    fd, probe = tempfile.mkstemp(prefix="calibrate-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        onnx.save(model, probe)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe, options, providers=["CPUExecutionProvider"])
        spec = kv_spec(session, model_path)
        feeds = {"input_ids": np.asarray([token_ids], np.int64), "attention_mask": np.ones((1, len(token_ids)), np.int64)}
        for name in spec.past_names:
            feeds[name] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), spec.dtype)
        values = session.run(list(tensors), feeds)
    finally:
        Path(probe).unlink(missing_ok=True)
    return {name: np.abs(v.reshape(-1, v.shape[-1])).max(axis=0) for name, v in zip(tensors, values)}


def save_in_place(model, model_path: Path) -> None:
    """Write ``model`` (every tensor in memory) over ``model_path`` and its one external data file,
    each replaced atomically."""
    import onnx

    data_name = model_path.name + ".data"
    with tempfile.TemporaryDirectory(prefix="requantize-", dir=model_path.parent) as work:
        out = Path(work) / model_path.name
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(Path(work) / data_name, model_path.parent / data_name)
        os.replace(out, model_path)


def smoothing_scales(act_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_k = amax_k^alpha / wmax_k^(1-alpha), normalised to geometric mean 1."""
    w_max = np.maximum(np.abs(weight).max(axis=0), 1e-5)
    scales = np.maximum(act_max, 1e-5) ** alpha / w_max ** (1 - alpha)
    return (scales / np.exp(np.mean(np.log(scales)))).astype(np.float32)


def requantize_engine_head(model_path: Path, scheme: HeadScheme, token_ids: list[int]) -> None:
    """Rewrite ``model_path`` (and its external data file) with the LM head in ``scheme``, smoothed when asked."""
    import onnx
    from onnx import numpy_helper

    weight = None
    norm_scale = None
    if scheme.smooth_alpha is not None:
        graph = onnx.load(str(model_path), load_external_data=False).graph
        found = final_norm(graph)
        if found is None:
            raise ValueError("the LM head's input is not a final RMSNorm's own output; it cannot be smoothed")
        norm, norm_scale = found
        act_max = activation_maxima(model_path, [norm.output[0]], token_ids)[norm.output[0]]
    model = onnx.load(str(model_path))  # every tensor in memory: the data file is rewritten below
    if norm_scale is not None:
        weight = head_weight(model)
        scales = smoothing_scales(act_max, weight, scheme.smooth_alpha)
        init = next(i for i in model.graph.initializer if i.name == norm_scale)
        init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) / scales).astype(np.float32), norm_scale))
        weight = weight * scales[None, :]
    requantize_lm_head(model, scheme, weight=weight)
    save_in_place(model, model_path)
