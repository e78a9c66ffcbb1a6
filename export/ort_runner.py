"""A plain batch-1 onnxruntime runner for exported causal LMs (optimum's ``text-generation-with-past`` I/O).

Used by export and ``toolkit validate`` as the reference path: it is deliberately simple (the
whole KV cache is fed back each step). The serving engine lives in ``toolkit.runtime``; sessions and
the KV layout come from ``toolkit.artifact``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.artifact.layout import head_size, kv_spec
from toolkit.artifact.onnx_session import create_session


def _session(model_path: Path, threads: int | None, native_attention: bool, kv_cache: str):
    """The model's session, its attention (over a ``kv_cache`` cache) and int8 products on our operators
    where asked and possible (``toolkit.artifact.native_attention``, ``native_linear``)."""
    if native_attention:
        import onnx

        from toolkit.artifact import native_attention as attention
        from toolkit.artifact import native_linear

        model = onnx.load(str(model_path), load_external_data=False)
        libraries = []
        if any(n.op_type == "GroupQueryAttention" for n in model.graph.node) and attention.swap_attention(model, head_size(model, model_path), kv_cache):
            libraries.append(attention.library())
        if native_linear.swap_linears(model):
            libraries.append(native_linear.library())
        if libraries:
            return create_session(model_path, threads, model=model, custom_ops=libraries)
    return create_session(model_path, threads)


class OrtCausalLM:
    """Batch-1 forward passes over an exported model: ``forward``, ``greedy`` and ``teacher_forced``."""

    def __init__(self, model_path: Path, threads: int | None = None, native_attention: bool = True,
                 kv_cache: str = "float32"):
        """``native_attention``: run GroupQueryAttention graphs on our operator where the serving engine
        does (``toolkit.artifact.native_attention``), over a ``kv_cache`` cache (``cache_dtype``), and the
        int8 products on ours (``toolkit.artifact.native_linear``), so ``toolkit validate`` measures what
        is served; False keeps onnxruntime's operators (the reference our operators' tests compare against)."""
        self.session = _session(model_path, threads, native_attention, kv_cache)
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
