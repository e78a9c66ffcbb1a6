"""Graph edits applied to optimum's fp32 export before anything else is built from it.

``keep_last_logits``: slice the hidden states to the last position before the LM head, so a
prefill of N tokens computes one row of logits instead of N. With a 262k-token vocabulary the LM
head is most of a prefill's work (measured on the default model: README, "Performance").
"""

from __future__ import annotations

from pathlib import Path

LAST_POSITION_TENSOR = "toolkit/last_position_hidden"


def _lm_head(graph):
    """The MatMul/Gemm that produces ``logits`` (walking back through element-wise ops such as softcapping)."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None:
        if node.op_type in ("MatMul", "Gemm"):
            return node
        node = producer.get(node.input[0])
    raise ValueError("could not find the LM head MatMul feeding 'logits' in the exported graph")


def keep_last_logits(model_path: Path) -> None:
    """Rewrite ``model_path`` in place so ``logits`` is ``[batch, 1, vocab]`` for the last input position."""
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    head = _lm_head(graph)
    consts = {
        "toolkit/slice_starts": np.array([-1], np.int64),
        "toolkit/slice_ends": np.array([np.iinfo(np.int64).max], np.int64),
        "toolkit/slice_axes": np.array([1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in consts.items())
    slice_node = helper.make_node(
        "Slice", [head.input[0], *consts], [LAST_POSITION_TENSOR], name="toolkit/keep_last_position"
    )
    head.input[0] = LAST_POSITION_TENSOR
    graph.node.insert(list(graph.node).index(head), slice_node)
    logits = next(o for o in graph.output if o.name == "logits")
    dim = logits.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 1
    onnx.save_model(model, str(model_path))


def logits_are_last_only(session) -> bool:
    """Whether a session's ``logits`` output has the single-position shape ``keep_last_logits`` gives."""
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    return logits.shape[1] == 1
