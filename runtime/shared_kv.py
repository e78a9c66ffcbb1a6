"""Preallocated KV cache for graphs whose attention writes into the cache in place (GroupQueryAttention).

``SharedKV`` owns one buffer per past input, ``[rows, kv_heads, capacity, head_dim]``. Row i of
the running batch is slot i; its tokens sit left-aligned in the first ``lengths[i]`` columns. The
graph reads past keys/values from the buffer and writes the new token's at column ``lengths[i]``
of the same buffer (``past_present_share_buffer``), so a decode step copies nothing.

Copies happen only when the batch changes shape: a joining sequence's prefill cache is copied into
its slot once; a leaving row's slot is refilled by moving the last row into it (one row); and
the buffers are reallocated in 64-token steps as the longest row grows or leaves (at most once
per 64 steps), never per step.

Rows are allocated in steps of ``ROW_QUANTUM`` and given back when the batch shrinks to a quarter
of them (all of them once it is empty), so a burst's buffer does not outlive the burst: measured on
the default model after a burst of 12 streams, the idle server kept a ``[16, 1, 320, 256]`` buffer
per past input (189 MB) until the next burst.
"""

from __future__ import annotations

import numpy as np

from toolkit.runtime.native_memory import trim_after_free

GROWTH_QUANTUM = 64
ROW_QUANTUM = 4


def round_up(n: int, quantum: int = GROWTH_QUANTUM) -> int:
    """``n`` rounded up to a multiple of ``quantum`` (at least one quantum)."""
    return max(quantum, -(-n // quantum) * quantum)


class SharedKV:
    """Slot-per-row KV buffers shared between a GQA graph's past inputs and present outputs."""

    def __init__(self, names: list[str], num_kv_heads: int, head_dim: int, dtype, max_length: int):
        self.names = names
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.max_length = max_length
        self.lengths: list[int] = []
        self.buffers = self._allocate(0, 0)
        self.reallocations = 0

    # ---- shape ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def row_capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[0]

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (live rows and spare slots)."""
        return sum(buffer.nbytes for buffer in self.buffers.values())

    def _allocate(self, rows: int, length: int) -> dict[str, np.ndarray]:
        shape = (rows, self.num_kv_heads, length, self.head_dim)
        return {name: np.zeros(shape, self.dtype) for name in self.names}

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` slots of ``length`` tokens, keeping every live row's cache."""
        if rows <= self.row_capacity and length <= self.capacity:
            return
        new_rows = max(self.row_capacity, round_up(rows, ROW_QUANTUM))
        self._reallocate(new_rows, max(self.capacity, min(self.max_length, round_up(length))), length)

    def _reallocate(self, new_rows: int, new_len: int, length: int) -> None:
        if new_len < length:
            raise ValueError(f"a sequence of {length} tokens exceeds the cache's {self.max_length}-token rows")
        fresh = self._allocate(new_rows, new_len)
        if self.size:
            used = max(self.lengths)
            for name in self.names:
                fresh[name][: self.size, :, :used] = self.buffers[name][: self.size, :, :used]
        freed, self.buffers = self.nbytes, fresh
        self.reallocations += 1
        trim_after_free(freed)

    # ---- batch membership --------------------------------------------------------------------
    def add_rows(self, rows: dict[str, np.ndarray], lengths: list[int]) -> None:
        """Append sequences whose caches are ``rows[name]`` ``[k or 1, heads, >= length, dim]``, left-aligned.

        A single source row is copied into every new slot (``n`` > 1 sequences sharing a prefill).
        """
        first = self.size
        self.reserve(first + len(lengths), max(lengths) + 1)
        for offset, length in enumerate(lengths):
            for name in self.names:
                source = rows[name]
                self.buffers[name][first + offset, :, :length] = source[min(offset, source.shape[0] - 1), :, :length]
        self.lengths.extend(lengths)

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep only rows ``keep``; returns the old row index now in each slot (the batch's new order).

        Each freed slot below the new size is refilled with the highest-numbered surviving row, so
        one row is copied per leaving sequence, not the whole batch.
        """
        survivors = set(keep)
        order = list(range(self.size))
        new_size = len(keep)
        holes = [i for i in range(new_size) if i not in survivors]
        movers = [i for i in range(new_size, self.size) if i in survivors]
        for hole, mover in zip(holes, movers):
            length = self.lengths[mover]
            for name in self.names:
                buffer = self.buffers[name]
                buffer[hole, :, :length] = buffer[mover, :, :length]
            order[hole] = mover
            self.lengths[hole] = length
        del order[new_size:]
        self.lengths = self.lengths[:new_size]
        self._shrink_rows()
        return order

    def _shrink_rows(self) -> None:
        """Give the slots back once at most a quarter are live (every slot once the batch is empty)."""
        if not self.size:
            if self.row_capacity:
                self._reallocate(0, 0, 0)
        elif self.size * 4 <= self.row_capacity and self.row_capacity > ROW_QUANTUM:
            needed = max(self.lengths) + 1
            self._reallocate(round_up(2 * self.size, ROW_QUANTUM), min(self.max_length, round_up(needed)), needed)

    # ---- one decode step -----------------------------------------------------------------------
    def step_views(self, tokens: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The live rows' buffers (views, no copy) and the attention mask for ``tokens`` more tokens per row
        (more than one: a speculative verify step, ``runtime/speculative.py``).

        onnxruntime's GroupQueryAttention costs time in proportion to the buffer's capacity, not
        only the rows' lengths (measured at batch 16, 236 cached tokens: 26 ms per step at capacity
        256, 35 ms at 512, 52 ms at 1024), so capacity grows in 64-token steps and shrinks once
        the longest row has left (each a copy of the live rows, at most once per 64 steps).
        """
        needed = max(self.lengths) + tokens
        if self.capacity - needed >= 2 * GROWTH_QUANTUM:
            self._reallocate(self.row_capacity, round_up(needed), needed)
        self.reserve(self.size, needed)
        views = {name: buffer[: self.size] for name, buffer in self.buffers.items()}
        lengths = np.asarray(self.lengths)
        mask = (np.arange(int(lengths.max()) + tokens)[None, :] < lengths[:, None] + tokens).astype(np.int64)
        return views, mask

    def accept_step(self, tokens: int = 1) -> None:
        """Every row gained the ``tokens`` tokens the step just wrote into its slot."""
        self.lengths = [n + tokens for n in self.lengths]

    def rollback(self, kept: list[int], fed: int) -> None:
        """After a ``fed``-token verify step, row i keeps only the first ``kept[i]`` of them.

        The rejected tokens' keys/values stay in the slot past the row's length, where the next
        step overwrites them and the mask hides them: rolling back is only a length change.
        """
        self.lengths = [n - fed + k for n, k in zip(self.lengths, kept)]
