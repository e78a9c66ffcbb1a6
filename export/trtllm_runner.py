"""``TrtLlmRunner``: the validation ``CausalRunner`` over a TensorRT-LLM 1.2.x engine directory.

Logits come from TensorRT-LLM's LLM API (``tensorrt_llm._tensorrt_engine.LLM``, TensorRT backend):

* ``greedy``: ``SamplingParams(top_k=1, ignore_eos=True, max_tokens=n, return_generation_logits=True)``
  (exactly ``n`` tokens, like the fp32 reference); ``outputs[0].generation_logits[0]`` is the
  first step's logits row. Generation logits need ``LLM(gather_generation_logits=True)``, a
  runtime option: the engine does not have to be rebuilt for it.
* ``teacher_forced``: when the engine was built with ``BuildConfig(gather_context_logits=True)``,
  one request over prompt + continuation[:-1] with ``return_context_logits=True`` (its
  ``context_logits`` rows from the last prompt position on). Otherwise one single-token greedy
  request per continuation position, batched by the executor, each giving its first generation
  logits row — the same numbers without the engine-wide cost of gathering context logits.

KV cache block reuse is turned off: with reuse, a repeated prompt prefix is not recomputed and
its context logits are missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifact.trtllm import import_tensorrt_llm, read_engine_config


class TrtLlmRunner:
    """Batch-1 greedy and teacher-forced logits from a TensorRT-LLM engine (needs a GPU)."""

    def __init__(self, engine_dir: Path, options: dict | None = None):
        """Start TensorRT-LLM on ``engine_dir``; ``TrtLlmUnavailableError`` when it cannot be imported.

        ``options``: the export options (``trtllm_build_plan``); ``max_attention_window`` and
        ``enable_chunked_prefill`` are applied as the serving engine applies them, so the long golden
        prompts are validated under the same sliding windows and prompt limit."""
        self.engine_dir = Path(engine_dir)
        self.options = dict(options or {})
        config = read_engine_config(self.engine_dir)
        self.context_logits = bool((config.get("build_config") or {}).get("gather_context_logits"))
        self.vocab_size = int((config.get("pretrained_config") or {}).get("vocab_size") or 0) or None
        api = import_tensorrt_llm()
        self._llmapi = importlib.import_module("tensorrt_llm.llmapi")
        self.llm = api.LLM(**self.llm_kwargs())

    def llm_kwargs(self) -> dict[str, Any]:
        """``LLM`` arguments: the engine dir, generation logits on, KV block reuse off."""
        kv: dict[str, Any] = {"enable_block_reuse": False}
        if self.options.get("max_attention_window"):
            kv["max_attention_window"] = [int(w) for w in self.options["max_attention_window"]]
        kwargs: dict[str, Any] = {
            "model": str(self.engine_dir),
            "gather_generation_logits": True,
            "kv_cache_config": self._llmapi.KvCacheConfig(**kv),
        }
        if self.options.get("enable_chunked_prefill"):
            kwargs["enable_chunked_prefill"] = True
        return kwargs

    def _params(self, max_tokens: int, **extra: Any) -> Any:
        return self._llmapi.SamplingParams(
            max_tokens=max_tokens, top_k=1, ignore_eos=True, detokenize=False,
            return_generation_logits=True, **extra,
        )

    def _rows(self, logits: Any) -> np.ndarray:
        """A logits tensor as float32 numpy ``[positions, vocab]`` (vocab padding cut off)."""
        if logits is None:
            raise RuntimeError("TensorRT-LLM returned no logits; is gather_generation_logits enabled?")
        array = logits.float().cpu().numpy() if hasattr(logits, "cpu") else np.asarray(logits, dtype=np.float32)
        array = array.reshape(-1, array.shape[-1]).astype(np.float32, copy=False)
        return array[:, : self.vocab_size] if self.vocab_size else array

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of ``prompt_ids`` (EOS ignored) and the first step's logits row."""
        result = self.llm.generate(list(prompt_ids), self._params(max_new_tokens), use_tqdm=False)
        output = result.outputs[0]
        return [int(t) for t in output.token_ids], self._rows(output.generation_logits)[0]

    def teacher_forced(self, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
        """Logits predicting each token of ``continuation`` from everything before it: [len(continuation), vocab]."""
        if self.context_logits:
            ids = list(prompt_ids) + list(continuation[:-1])
            result = self.llm.generate(ids, self._params(1, return_context_logits=True), use_tqdm=False)
            return self._rows(result.context_logits)[len(prompt_ids) - 1 :]
        prompts = [list(prompt_ids) + list(continuation[:i]) for i in range(len(continuation))]
        results = self.llm.generate(prompts, self._params(1), use_tqdm=False)
        return np.stack([self._rows(r.outputs[0].generation_logits)[0] for r in results])

    def close(self) -> None:
        """Shut TensorRT-LLM's executor down (also happens when the runner is garbage collected)."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def __enter__(self) -> "TrtLlmRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
