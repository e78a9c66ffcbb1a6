"""A plain batch-1 onnxruntime runner for exported causal LMs (optimum's ``text-generation-with-past`` I/O).

Used by export and ``toolkit validate`` as the reference path: it is deliberately simple (the
whole KV cache is fed back each step). The serving engine lives in ``toolkit.runtime``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.export.gqa_export import GENAI_CONFIG

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """Execution providers to use, CUDA first where onnxruntime-gpu and a GPU are present."""
    have = ort.get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu else ["CPUExecutionProvider"]
    return [p for p in order if p in have] or ["CPUExecutionProvider"]


def create_session(model_path: Path, threads: int | None = None, prefer_gpu: bool = True) -> ort.InferenceSession:
    """An onnxruntime session with all graph optimisations and ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or int(os.environ.get("TOOLKIT_THREADS", "0")) or (os.cpu_count() or 1)
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=available_providers(prefer_gpu))


@dataclass(frozen=True)
class KvSpec:
    """Layout of the exported model's KV cache inputs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: type

    @property
    def past_names(self) -> list[str]:
        """The graph's cache inputs in layer order: ``past_key_values.N.key``, ``past_key_values.N.value``."""
        return [f"past_key_values.{layer}.{kind}" for layer in range(self.num_layers) for kind in ("key", "value")]

    def as_manifest(self, graph: str = "optimum") -> dict:
        """The manifest's ``kv_layout`` for an artifact of ``graph``."""
        layout = "[batch, kv_heads, seq, head_dim] per layer, past_key_values.N.key/value"
        if graph == "gqa":
            layout = "[batch, kv_heads, capacity, head_dim] per layer, updated in place (past and present share a buffer)"
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": np.dtype(self.dtype).name,
            "layout": layout,
        }


def kv_spec(session: ort.InferenceSession, model_path: Path | None = None) -> KvSpec:
    """Read the KV cache layout from the session's ``past_key_values.N.key`` inputs.

    onnxruntime-genai's graphs name the head dimension symbolically; it is then read from the
    ``genai_config.json`` written beside ``model_path``.
    """
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not past:
        raise ValueError("the ONNX model has no past_key_values inputs; export it with text-generation-with-past")
    first = past[0]
    head_dim = first.shape[3]
    if not isinstance(head_dim, int):
        config = json.loads((Path(model_path).parent / GENAI_CONFIG).read_text())
        head_dim = config["model"]["decoder"]["head_size"]
    return KvSpec(len(past), int(first.shape[1]), int(head_dim), _ORT_TO_NUMPY[first.type])


class OrtCausalLM:
    """Batch-1 forward passes over an exported model: ``forward``, ``greedy`` and ``teacher_forced``."""

    def __init__(self, model_path: Path, threads: int | None = None):
        self.session = create_session(model_path, threads)
        self.spec = kv_spec(self.session, model_path)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _empty_past(self) -> dict[str, np.ndarray]:
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return {name: np.zeros(shape, dtype=self.spec.dtype) for name in self.spec.past_names}

    def forward(self, ids: list[int], past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after ``past``; return float32 logits [len(ids), vocab] and the new past."""
        past = past if past is not None else self._empty_past()
        past_len = next(iter(past.values())).shape[2]
        total = past_len + len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), **past}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new_past = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in outputs.items()
            if name.startswith("present.")
        }
        return outputs["logits"][0].astype(np.float32), new_past

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of ``prompt_ids`` and the first step's logits row."""
        logits, past = self.forward(prompt_ids, None)
        first = logits[-1]
        tokens = [int(first.argmax())]
        while len(tokens) < max_new_tokens:
            logits, past = self.forward([tokens[-1]], past)
            tokens.append(int(logits[-1].argmax()))
        return tokens, first

    def teacher_forced(self, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
        """Logits predicting each token of ``continuation`` given everything before it: [len(continuation), vocab].

        The graph returns logits for the last position only, so the continuation is fed one token
        at a time through the KV cache (the same path serving takes).
        """
        logits, past = self.forward(list(prompt_ids), None)
        rows = [logits[-1]]
        for token in continuation[:-1]:
            logits, past = self.forward([token], past)
            rows.append(logits[-1])
        return np.stack(rows)
