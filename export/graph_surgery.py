"""Graph edits applied to optimum's fp32 export before anything else is built from it.

``share_single_kv_head``: for multi-query attention (one KV head, the default model), bypass the
``repeat_kv`` Unsqueeze → Expand → Reshape that copies the whole cache once per query head on
every step; MatMul broadcasting over the head axis computes the same thing without the copy.

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


def _single_kv_head(graph) -> bool:
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    return bool(past) and all(i.type.tensor_type.shape.dim[1].dim_value == 1 for i in past)


def _shape_reads_only_non_head_dims(shape_node, consumers, constants) -> bool:
    """True when every use of a Shape output is a Gather of a dim other than the head axis (1)."""
    uses = consumers.get(shape_node.output[0], [])
    return all(
        use.op_type == "Gather" and use.input[1] in constants and int(constants[use.input[1]]) not in (1, -3)
        for use in uses
    )


def _constant_values(graph) -> dict:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer if not init.dims}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.ndim == 0:
                values[node.output[0]] = array
    return values


def share_single_kv_head(model_path: Path) -> int:
    """Bypass ``repeat_kv`` on ``present.*`` tensors when the model has one KV head; returns how many."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if not _single_kv_head(graph):
        return 0
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constant_values(graph)
    rewired = 0
    for reshape in [n for n in graph.node if n.op_type == "Reshape"]:
        expand = producer.get(reshape.input[0])
        unsqueeze = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or not unsqueeze.input[0].startswith("present."):
            continue
        users = consumers.get(reshape.output[0], [])
        shapes_ok = all(_shape_reads_only_non_head_dims(u, consumers, constants) for u in users if u.op_type == "Shape")
        if not shapes_ok:
            continue
        for user in users:
            user.input[list(user.input).index(reshape.output[0])] = unsqueeze.input[0]
        rewired += 1
    _prune_dead_nodes(graph)
    onnx.save_model(model, str(model_path))
    return rewired


def _prune_dead_nodes(graph) -> None:
    """Remove nodes none of whose outputs is used (onnxruntime would still run them)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def logits_are_last_only(session) -> bool:
    """Whether a session's ``logits`` output has the single-position shape ``keep_last_logits`` gives."""
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    return logits.shape[1] == 1
