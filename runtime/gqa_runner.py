"""One onnxruntime session over a GroupQueryAttention graph (``--graph gqa``), fed through IOBinding.

The graph (built by onnxruntime-genai's model builder) takes ``input_ids``, ``attention_mask`` and
``past_key_values.N.key/value``; its attention computes each row's length and rotary positions
from the mask, and writes the new keys/values into the past buffer itself when ``present.N.*`` is
bound to the same memory. Both prefill and decode therefore run over preallocated buffers with no
cache copy per step (see ``toolkit.runtime.shared_kv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.artifact import native_attention, native_linear
from toolkit.artifact.layout import head_size, kv_spec
from toolkit.artifact.onnx_session import create_session, session_threads
from toolkit.runtime.native_head import MAX_ARGMAX_ROWS, split_lm_head
from toolkit.runtime.shared_kv import SharedKV, mapped_arrays, round_up
from toolkit.runtime.speculative import LOGITS_KEEP_INPUT, keep_positions


class GqaModelRunner:
    """Chunked batch-1 prefill and batched decode over shared past/present buffers."""

    def __init__(self, model_path: Path, threads: int | None = None, max_length: int = 1 << 15, verify: bool = False,
                 kv_cache: str = "float32"):
        """``verify``: open the graph so a run can return logits for several last positions (``verify``).

        An int8 graph's LM head runs on ``toolkit.runtime.native_head`` where that kernel can run (same
        logits, bitwise); the graph then returns the head's quantized input instead of ``logits``. Its
        attention and int8 layer products run on our custom operators where they can
        (``toolkit.artifact.native_attention``, ``toolkit.artifact.native_linear``).
        ``kv_cache``: the cache's element type where the attention runs on our operator
        (``toolkit.artifact.native_attention.cache_dtype``); the buffers follow the graph (``spec.dtype``).
        """
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)  # the graph only; edited in memory
        edited = verify and keep_positions(model)
        self.head = split_lm_head(model, model_path.parent, session_threads(threads))
        # our GroupQueryAttention operator where it can run (toolkit.artifact.native_attention)
        self.native_attention = native_attention.swap_attention(model, head_size(model, model_path), kv_cache)
        # the layers' int8 products on our operators (toolkit.artifact.native_linear), the head split first
        self.native_linear = native_linear.swap_linears(model) > 0
        libraries = [lib.library() for lib, used in ((native_attention, self.native_attention), (native_linear, self.native_linear)) if used]
        self.session = create_session(model_path, threads, model=model if edited or self.head or libraries else None,
                                      custom_ops=libraries)
        self.can_verify = LOGITS_KEEP_INPUT in {i.name for i in self.session.get_inputs()}
        self.spec = kv_spec(self.session, model_path)
        self.max_length = max_length
        self.past_names = self.spec.past_names
        self.present_of = {n: n.replace("past_key_values.", "present.", 1) for n in self.past_names}
        if self.head is not None:
            self.vocab_size = self.head.head.vocab
            positions = next(o for o in self.session.get_outputs() if o.name == self.head.q_output).shape[1]
            # the head's input covers the last ``keep`` positions only (the builder's last-position pick,
            # ``keep_positions``), so its shape is known before the run and ours to allocate
            self._head_input_shape_known = positions in (1, "logits_positions")
            self.vocab: int | None = self.vocab_size  # the width of the reused float32 logits buffer, if any
        else:
            logits = next(o for o in self.session.get_outputs() if o.name == "logits")
            self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else 0  # 0: symbolic in the graph
            self.vocab = self.vocab_size if self.vocab_size and logits.type == "tensor(float)" else None
        self._logits = np.empty(0, np.float32)  # grown to the largest run's [rows, positions, vocab], reused
        # each row's argmax of the logits the last ``decode`` returned, where the head kernel found it
        # (``Int8Head``: while computing them, instead of numpy reading them back); else None
        self.argmax: np.ndarray | None = None

    def new_batch(self) -> SharedKV:
        """An empty decode batch of preallocated slots."""
        return SharedKV(self.past_names, self.spec.num_kv_heads, self.spec.head_dim, self.spec.dtype, self.max_length)

    def _run(self, ids: np.ndarray, mask: np.ndarray, buffers: dict[str, np.ndarray],
             lora: dict[str, np.ndarray] | None = None, keep: int = 1, argmax: np.ndarray | None = None,
             head: bool = True) -> np.ndarray | None:
        """One run over ``buffers``; its ``[rows, keep, vocab]`` logits. ``head`` False: the caller has no use
        for them, and where the LM head runs outside the graph it is not run (None is returned)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.can_verify:
            binding.bind_cpu_input(LOGITS_KEEP_INPUT, np.array([-keep], np.int64))
        for name, value in (lora or {}).items():  # LoRA graph inputs (toolkit.runtime.lora)
            binding.bind_cpu_input(name, value)
        logits = self._logits_out(ids.shape[0], keep)
        q = row_scale = None
        if self.head is not None and self._head_input_shape_known:
            # the graph stops at the LM head's input, bound to arrays of ours: no ``get_outputs``, which
            # wraps every bound output (the KV buffers too) in a new OrtValue, ~0.3 ms a step at 36 buffers
            q = np.empty((ids.shape[0], keep, self.head.head.hidden), np.uint8)
            row_scale = np.empty((ids.shape[0], keep, 1), np.float32)
            binding.bind_ortvalue_output(self.head.q_output, ort.OrtValue.ortvalue_from_numpy(q))
            binding.bind_ortvalue_output(self.head.scale_output, ort.OrtValue.ortvalue_from_numpy(row_scale))
        elif self.head is not None:
            binding.bind_output(self.head.q_output)
            binding.bind_output(self.head.scale_output)
        elif logits is None:
            binding.bind_output("logits")
        else:
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        for name, buffer in buffers.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # wraps the numpy memory, no copy
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(self.present_of[name], value)
        self.session.run_with_iobinding(binding)
        if self.head is not None:
            if not head:
                return None
            if q is None:
                q, row_scale = (value.numpy() for value in binding.get_outputs()[:2])
            return self.head.head(q, row_scale, logits, argmax)
        return binding.get_outputs()[0].numpy() if logits is None else logits

    def _logits_out(self, rows: int, positions: int) -> np.ndarray | None:
        """The run's ``[rows, positions, vocab]`` logits, a view of one reused float32 buffer (the next run
        overwrites it), or None when the graph's vocabulary size is not static or its logits not float32.

        Letting onnxruntime allocate the output and copying it out (``OrtValue.numpy``) cost two
        allocations and a copy of ``rows x 1 MiB`` per step on the default model (262,144-token
        vocabulary), of sizes that change with the batch: heap churn that glibc keeps as free memory.
        """
        if self.vocab is None:
            return None
        size = rows * positions * self.vocab
        if self._logits.size < size:
            self._logits = np.empty(size, np.float32)
        return self._logits[:size].reshape(rows, positions, self.vocab)

    def _prefill_buffers(self, past: dict[str, np.ndarray] | None, start: int, total: int) -> dict[str, np.ndarray]:
        if past is not None and next(iter(past.values())).shape[2] >= total:
            return past
        shape = (1, self.spec.num_kv_heads, min(self.max_length, round_up(total)), self.spec.head_dim)
        flat = mapped_arrays(self.past_names, int(np.prod(shape)), self.spec.dtype)  # off the heap: a prompt's
        fresh = {name: array.reshape(shape) for name, array in flat.items()}  # size varies, glibc would keep it
        if past is not None and start:
            for name in self.past_names:
                fresh[name][:, :, :start] = past[name][:, :, :start]
        return fresh

    def prefill(self, ids: list[int], past: dict[str, np.ndarray] | None, start: int,
                lora: dict[str, np.ndarray] | None = None, logits: bool = True) -> tuple[np.ndarray | None, dict]:
        """Run one prompt chunk of one sequence after ``start`` cached tokens; last-position logits + its buffers.

        ``logits`` False (a chunk before the prompt's last): None in their place, and the kernel LM head is
        not run: a 1-row head reads all 168 MB of the default model's head weights, ~4 ms a chunk.
        """
        total = start + len(ids)
        buffers = self._prefill_buffers(past, start, total)
        out = self._run(np.asarray([ids], np.int64), np.ones((1, total), np.int64), buffers, lora, head=logits)
        if not logits:
            return None, buffers
        return out[0, -1].astype(np.float32, copy=True), buffers  # a copy: kept until the sequence joins

    def decode(self, batch: SharedKV, last_tokens: list[int], positions: list[int],
               lora: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One token for every row of ``batch`` (positions come from the rows' lengths); logits ``[rows, vocab]``,
        valid until the next run."""
        buffers, mask = batch.step_views()
        rows = len(last_tokens)
        self.argmax = np.empty(rows, np.int32) if self.head is not None and rows <= MAX_ARGMAX_ROWS else None
        logits = self._run(np.asarray(last_tokens, np.int64)[:, None], mask, buffers, lora, argmax=self.argmax)
        batch.accept_step()
        return logits[:, -1].astype(np.float32, copy=False)

    def verify(self, batch: SharedKV, tokens: list[list[int]], positions: list[int],
               lora: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run ``tokens[i]`` (the row's last token + its draft, every row the same length) after each row's
        cache; logits ``[rows, fed, vocab]``. The cache keeps all of them until ``batch.rollback``.

        onnxruntime's CPU GroupQueryAttention refuses ``S > 1`` new tokens after a past at batch > 1
        ("batch_size must be 1 when sequence_length > 1 and past context is given", onnxruntime 1.31),
        so there several rows verify one after the other, each over its own slot (a view of the shared
        buffer, no copy); our operator (``native_attention``) takes them in one run. Speculation runs
        at batch 1 by default (``SpeculativeConfig.max_batch``), where this is one run either way.
        """
        fed = len(tokens[0])
        self.argmax = None  # a plain decode's only
        buffers, mask = batch.step_views(fed)
        if batch.size == 1 or self.native_attention:
            logits = self._run(np.asarray(tokens, np.int64), mask, buffers, lora, keep=fed)
        else:
            rows = []
            for i, row_tokens in enumerate(tokens):
                row_mask = np.ones((1, batch.lengths[i] + fed), np.int64)
                row_buffers = {name: buffer[i:i + 1] for name, buffer in buffers.items()}
                rows.append(self._run(np.asarray([row_tokens], np.int64), row_mask, row_buffers, lora, keep=fed)[0].copy())
            logits = np.stack(rows)
        batch.accept_step(fed)
        return logits.astype(np.float32, copy=False)
