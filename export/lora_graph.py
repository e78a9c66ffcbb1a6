"""The ONNX LoRA graph and the adapter conversion for it (steps 2-3 of ``export/lora.py``).

Graph surgery: ``add_lora_inputs`` gives an ONNX engine directory a second graph, ``model.lora.onnx``, in
which every decoder projection ``y = x @ W`` also adds a per-row low-rank path fed by graph inputs
(``ensure_lora_graph`` builds it once per engine). ``convert`` turns a PEFT adapter into the tensors those
inputs take (``A = lora_A.T``, ``B = lora_B.T * scale``; q/k/v or gate/up stacked for a packed projection),
checking every shape against the graph. Kept apart from the command because it is the only code that
edits ONNX graphs and the only code that knows the engine-side tensor layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from toolkit.artifact.layout import MODEL_FILE
from toolkit.artifact.lora import LORA_MODEL_FILE, PACKED, AdapterError, a_input, b_input
from toolkit.artifact.manifest import Manifest
from toolkit.export.lora_peft import PeftAdapter

_GRAPH_NODE = re.compile(r"/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+_proj)/MatMul(?:_Q\d+)?$")


def add_lora_inputs(model_path: Path, out_path: Path) -> dict[str, tuple[int, int]]:
    """Write ``out_path``: ``model_path`` with a per-row low-rank path on every decoder projection.

    ``y = x @ W`` (MatMul or MatMulNBits) becomes ``y + (x @ lora_A.m) @ lora_B.m``. The graph keeps
    pointing at the original external weights file (same directory). Returns ``{module: (in, out)}``.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    targets = []
    for index, node in enumerate(graph.node):
        match = _GRAPH_NODE.search(node.name)
        if match is None or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        if node.op_type == "MatMul":
            weight = dims.get(node.input[1])
            if weight is None or len(weight) != 2:
                continue
            fan_in, fan_out = weight
        else:
            attrs = {a.name: a.i for a in node.attribute}
            fan_in, fan_out = attrs["K"], attrs["N"]
        targets.append((index, node, f"layers.{match.group(1)}.{match.group(2)}", int(fan_in), int(fan_out)))
    if not targets:
        raise AdapterError(f"{model_path}: found no decoder projection MatMul to attach LoRA to")
    modules = {}
    for index, node, module, fan_in, fan_out in reversed(targets):
        y = node.output[0]
        low, delta, summed = f"{y}/lora_low", f"{y}/lora_delta", f"{y}/lora"
        for user in consumers.get(y, []):
            user.input[:] = [summed if name == y else name for name in user.input]
        new = [
            helper.make_node("MatMul", [node.input[0], a_input(module)], [low], name=f"{node.name}/lora_A"),
            helper.make_node("MatMul", [low, b_input(module)], [delta], name=f"{node.name}/lora_B"),
            helper.make_node("Add", [y, delta], [summed], name=f"{node.name}/lora_add"),
        ]
        for offset, extra in enumerate(new):
            graph.node.insert(index + 1 + offset, extra)
        rank = f"lora_rank_{module}"
        graph.input.append(helper.make_tensor_value_info(a_input(module), TensorProto.FLOAT, ["lora_rows", fan_in, rank]))
        graph.input.append(helper.make_tensor_value_info(b_input(module), TensorProto.FLOAT, ["lora_rows", rank, fan_out]))
        modules[module] = (fan_in, fan_out)
    onnx.save_model(model, str(out_path))
    return dict(sorted(modules.items()))



def ensure_lora_graph(engine_dir: Path, manifest: Manifest) -> dict[str, tuple[int, int]]:
    """The engine's LoRA graph (built on first use); ``{module: (in, out)}``."""
    if manifest.target != "onnx":
        raise AdapterError(f"{engine_dir} is a {manifest.target} engine; it has no ONNX LoRA graph")
    if manifest.precision not in ("fp32", "int8"):
        raise AdapterError(f"{engine_dir} is {manifest.precision}; LoRA adapters need an fp32 or int8 engine "
                           "(their low-rank path runs in fp32)")
    path = engine_dir / LORA_MODEL_FILE
    if path.is_file() and LORA_MODEL_FILE in manifest.files:
        from toolkit.artifact.lora import graph_modules
        from toolkit.artifact.onnx_session import create_session

        return graph_modules(create_session(path, threads=1))
    tmp = engine_dir / (LORA_MODEL_FILE + ".tmp")
    modules = add_lora_inputs(engine_dir / MODEL_FILE, tmp)
    tmp.replace(path)
    return modules



def convert(adapter: PeftAdapter, modules: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The engine-format tensors ``{module.A: [in, r], module.B: [r, out]}`` for the graph's ``modules``."""
    tensors: dict[str, np.ndarray] = {}
    packed_of = {f"{m.rsplit('.', 1)[0]}.{part}": (m, i) for m in modules for i, part in
                 enumerate(PACKED.get(m.rsplit(".", 1)[1], ()))}
    grouped: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for module, (a, b) in adapter.weights.items():
        if module in modules:
            fan_in, fan_out = modules[module]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterError(
                    f"adapter {adapter.path}: {module} maps {a.shape[1]} -> {b.shape[0]} features, this engine's "
                    f"{module} maps {fan_in} -> {fan_out}: wrong base model or wrong shapes"
                )
            tensors[f"{module}.A"] = np.ascontiguousarray(a.T)
            tensors[f"{module}.B"] = np.ascontiguousarray(b.T)
        elif module in packed_of:
            target, part = packed_of[module]
            grouped.setdefault(target, {})[part] = (a, b)
        else:
            raise AdapterError(f"adapter {adapter.path}: {module} has no matching projection in this engine's graph "
                               "(wrong base model: more layers or other projections)")
    for target, parts in grouped.items():
        tensors.update(_pack(adapter, target, parts, modules[target]))
    return tensors


def _pack(adapter: PeftAdapter, target: str, parts: dict, dims: tuple[int, int]) -> dict[str, np.ndarray]:
    """q/k/v (or gate/up) adapters of one packed projection: A stacked along the rank, B block-diagonal."""
    fan_in, fan_out = dims
    names = PACKED[target.rsplit(".", 1)[1]]
    outs = {i: b.shape[0] for i, (_, b) in parts.items()}
    if len(outs) < len(names):  # sizes of untargeted parts: the packed width minus the known ones, split evenly
        missing = [i for i in range(len(names)) if i not in outs]
        rest = fan_out - sum(outs.values())
        for i in missing:
            outs[i] = rest // len(missing)
    if sum(outs.values()) != fan_out or any(a.shape[1] != fan_in for a, _ in parts.values()):
        raise AdapterError(f"adapter {adapter.path}: {', '.join(names)} do not fit this engine's packed {target} "
                           f"({fan_in} -> {fan_out}): wrong base model or wrong shapes")
    rank = sum(a.shape[0] for a, _ in parts.values())
    a_all = np.zeros((fan_in, rank), np.float32)
    b_all = np.zeros((rank, fan_out), np.float32)
    r0, col = 0, 0
    for i in range(len(names)):
        if i in parts:
            a, b = parts[i]
            a_all[:, r0:r0 + a.shape[0]] = a.T
            b_all[r0:r0 + a.shape[0], col:col + outs[i]] = b.T
            r0 += a.shape[0]
        col += outs[i]
    return {f"{target}.A": a_all, f"{target}.B": b_all}

