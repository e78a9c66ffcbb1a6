"""One onnxruntime session over an exported causal LM: chunked batch-1 prefill and batched decode steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.artifact.layout import kv_spec
from toolkit.artifact.onnx_session import create_session
from toolkit.runtime.kv_cache import BatchKV
from toolkit.runtime.speculative import LOGITS_KEEP_INPUT, verify_session


class OnnxModelRunner:
    """Feeds optimum's ``text-generation-with-past`` graph; knows nothing of requests or sampling."""

    def __init__(self, model_path: Path, threads: int | None = None, verify: bool = False):
        """``verify``: open the graph so a run can return logits for several last positions (``verify``)."""
        self.session = (verify_session(model_path, threads) if verify else None) or create_session(model_path, threads)
        self.can_verify = LOGITS_KEEP_INPUT in {i.name for i in self.session.get_inputs()}
        self.spec = kv_spec(self.session)
        inputs = {i.name for i in self.session.get_inputs()}
        self.has_position_ids = "position_ids" in inputs
        self.past_names = self.spec.past_names
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        self.output_names = ["logits", *self.present_names]
        dim = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab_size = dim if isinstance(dim, int) else 0  # the logits' width; 0 where the graph leaves it symbolic

    def new_batch(self) -> BatchKV:
        """An empty decode batch matching this model's cache layout."""
        return BatchKV(self.past_names, self.spec.num_kv_heads, self.spec.head_dim, self.spec.dtype)

    def empty_past(self) -> dict[str, np.ndarray]:
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return {name: np.zeros(shape, self.spec.dtype) for name in self.past_names}

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict[str, np.ndarray],
             lora: dict[str, np.ndarray] | None = None, keep: int = 1):
        feeds = {"input_ids": ids, "attention_mask": mask, **past, **(lora or {})}
        if self.can_verify:
            feeds[LOGITS_KEEP_INPUT] = np.array([-keep], np.int64)
        if self.has_position_ids:
            feeds["position_ids"] = positions
        outputs = self.session.run(self.output_names, feeds)
        present = dict(zip(self.past_names, outputs[1:]))
        return outputs[0], present

    def prefill(self, ids: list[int], past: dict[str, np.ndarray] | None, start: int,
                lora: dict[str, np.ndarray] | None = None, logits: bool = True) -> tuple[np.ndarray | None, dict]:
        """Run one prompt chunk of one sequence after ``past`` (``start`` tokens); last-position logits + new past.

        ``lora``: the LoRA graph's adapter inputs (``toolkit.runtime.lora``), when serving adapters;
        ``logits`` False: the caller does not need them (None is returned; the graph computes them anyway).
        """
        past = past if past is not None else self.empty_past()
        total = start + len(ids)
        out, present = self._run(
            np.asarray([ids], np.int64),
            np.ones((1, total), np.int64),
            np.arange(start, total, dtype=np.int64)[None, :],
            past,
            lora,
        )
        return (out[0, -1].astype(np.float32, copy=False) if logits else None), present

    def decode(self, batch: BatchKV, last_tokens: list[int], positions: list[int],
               lora: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One token for every row of ``batch``; returns logits ``[rows, vocab]`` and advances the cache."""
        past, mask = batch.step_inputs()
        logits, present = self._run(
            np.asarray(last_tokens, np.int64)[:, None],
            mask,
            np.asarray(positions, np.int64)[:, None],
            past,
            lora,
        )
        batch.accept_step(present, mask)
        return logits[:, -1].astype(np.float32, copy=False)


    def verify(self, batch: BatchKV, tokens: list[list[int]], positions: list[int],
               lora: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run ``tokens[i]`` (last token + draft, the same count for every row) from ``positions[i]`` on;
        logits ``[rows, fed, vocab]``. The cache keeps every fed token until ``batch.rollback``."""
        fed = len(tokens[0])
        past, mask = batch.step_inputs(fed)
        logits, present = self._run(
            np.asarray(tokens, np.int64),
            mask,
            np.asarray(positions, np.int64)[:, None] + np.arange(fed, dtype=np.int64)[None, :],
            past,
            lora,
            keep=fed,
        )
        batch.accept_step(present, mask)
        return logits.astype(np.float32, copy=False)


def create_runner(graph: str, model_path: Path, threads: int | None, context_length: int, verify: bool = False,
                  kv_cache: str = "float32"):
    """The model runner for an engine directory's graph flavour (``export_options.graph``); ``verify``: able
    to run speculative verify steps (``runtime/speculative.py``; check ``runner.can_verify``); ``kv_cache``:
    the cache's element type on our attention operator (``GqaModelRunner``)."""
    if graph == "gqa":
        from toolkit.runtime.gqa_runner import GqaModelRunner

        return GqaModelRunner(model_path, threads, max_length=context_length, verify=verify, kv_cache=kv_cache)
    return OnnxModelRunner(model_path, threads, verify=verify)
