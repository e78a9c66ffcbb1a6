"""Preallocated KV cache for graphs whose attention writes into the cache in place (GroupQueryAttention).

``SharedKV`` lays one buffer per past input, ``[rows, kv_heads, capacity, head_dim]``, over an
arena of its own. Row i of the running batch is slot i; its tokens sit left-aligned in the first
``lengths[i]`` columns. The graph reads past keys/values from the buffer and writes the new
token's at column ``lengths[i]`` of the same buffer (``past_present_share_buffer``), so a decode
step copies nothing.

Copies happen only when the batch changes shape: a joining sequence's prefill cache is copied into
its slot once; a leaving row's slot is refilled by moving the last row into it (one row); and the
capacity follows the longest row in 64-token steps (at most once per 64 steps), which re-lays the
live rows out *inside the arena*.

Why an arena: the buffers used to be reallocated (``np.zeros``, copy, free, ``malloc_trim``) on
every capacity or row-count change. Traced on the default model (int8 gqa, 16 closed-loop streams,
108-token prompts, AMD EPYC 2 cores), such a step took 200-360 ms against ~40 ms for a plain
decode step: fresh pages faulted in under the attention kernel, the copy, and the trim walking
glibc's heap. Those steps were the streams' p99 inter-token latency. The arena is one anonymous
memory map, populated when it is mapped (``MAP_POPULATE``), that only grows (to the largest
``rows × capacity`` the batch has needed, rows in ``ROW_QUANTUM`` steps) and is unmapped when the
batch empties: steady load re-lays rows out in place (a copy of the live tokens only, no page
faults, no allocator), and the memory is handed straight back to the kernel, not to glibc's heap.
Rows that leave no longer shrink anything: the step's views have exactly the live rows, so a single
stream after a burst runs on a one-row view (issue #13's after-burst slowdown), and the arena is
bounded by the admitted reservations (``KVCacheManager``, rectangular accounting) plus rounding.
"""

from __future__ import annotations

import numpy as np

from toolkit.runtime.native_memory import anonymous_map

GROWTH_QUANTUM = 64
ROW_QUANTUM = 4


def round_up(n: int, quantum: int = GROWTH_QUANTUM) -> int:
    """``n`` rounded up to a multiple of ``quantum`` (at least one quantum)."""
    return max(quantum, -(-n // quantum) * quantum)


def mapped_arrays(names: list[str], elements: int, dtype, populate: bool = False) -> dict[str, np.ndarray]:
    """One flat zeroed array of ``elements`` per name, side by side in one anonymous memory map
    (``native_memory.anonymous_map``), populated up front when ``populate``.

    The map is unmapped when its last array is gone, so its pages go straight back to the kernel
    instead of staying in glibc's heap as free memory of an odd size (issue 13, memory).
    """
    dtype = np.dtype(dtype)
    flat = np.frombuffer(anonymous_map(len(names) * elements * dtype.itemsize, populate), dtype, len(names) * elements)
    return {name: flat[i * elements:(i + 1) * elements] for i, name in enumerate(names)}


class SharedKV:
    """Slot-per-row KV buffers shared between a GQA graph's past inputs and present outputs."""

    def __init__(self, names: list[str], num_kv_heads: int, head_dim: int, dtype, max_length: int):
        self.names = names
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.max_length = max_length
        self.lengths: list[int] = []
        self.reallocations = 0  # arenas mapped (growth)
        self.relayouts = 0  # capacity changes done in place
        self._arena_tokens = 0  # rows x capacity the arena holds, per past input (0: no arena)
        self._arenas: dict[str, np.ndarray] = {}  # name -> its flat part of the map
        self._capacity = 0
        self.buffers: dict[str, np.ndarray] = {}
        self._lay_out(0)

    # ---- shape ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def row_capacity(self) -> int:
        """Rows the current layout holds (the arena's tokens over the capacity)."""
        return self._arena_tokens // self._capacity if self._capacity else 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the arena (live rows and spare room)."""
        return len(self.names) * self._token_elements * self._arena_tokens * self.dtype.itemsize

    @property
    def _token_elements(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _lay_out(self, capacity: int) -> None:
        """Point ``buffers`` at the arena as ``[row_capacity, heads, capacity, dim]``."""
        self._capacity = capacity
        rows = self.row_capacity
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        count = rows * capacity * self._token_elements
        self.buffers = {name: (self._arenas[name][:count] if count else np.zeros(0, self.dtype)).reshape(shape)
                        for name in self.names}

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` slots of ``length`` tokens, keeping every live row's cache."""
        if rows <= self.row_capacity and length <= self.capacity:
            return
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens exceeds the cache's {self.max_length}-token rows")
        capacity = max(self.capacity, min(self.max_length, round_up(length)))
        self._resize(max(rows, self.size), capacity)

    def _resize(self, rows: int, capacity: int) -> None:
        """Lay the live rows out at ``capacity`` tokens per slot with room for ``rows`` rows: in place
        when the arena holds that, else in a larger arena (mapped, filled, the old one unmapped)."""
        if rows * capacity <= self._arena_tokens:
            if capacity != self.capacity:
                self._move_slots(capacity)
                self.relayouts += 1
            self._lay_out(capacity)
            return
        old = self.buffers  # views of the old map, unmapped once they are gone (numpy holds its reference)
        self._arena_tokens = max(self._arena_tokens, round_up(rows, ROW_QUANTUM) * capacity)
        self._arenas = mapped_arrays(self.names, self._arena_tokens * self._token_elements, self.dtype, populate=True)
        self.reallocations += 1
        self._lay_out(capacity)
        used = max(self.lengths, default=0)
        for name in self.names:
            self.buffers[name][: self.size, :, :used] = old[name][: self.size, :, :used]

    def _move_slots(self, capacity: int) -> None:
        """Re-lay the live slots (row, head) from ``self.capacity`` to ``capacity`` tokens each, in place.

        Slot s moves from ``s * old`` to ``s * new`` (times the head size): growing, the last slot
        moves first, so no slot lands on one not yet moved; shrinking, the first does. Only the
        used tokens are copied (numpy buffers a move whose ends overlap).
        """
        old, used, dim = self.capacity, max(self.lengths, default=0), self.head_dim
        slots = range(self.size * self.num_kv_heads)
        for name in self.names:
            flat = self._arenas[name]
            for s in (reversed(slots) if capacity > old else slots):
                flat[s * capacity * dim:(s * capacity + used) * dim] = flat[s * old * dim:(s * old + used) * dim]

    def _release(self) -> None:
        """Drop the arena (the batch is empty): unmapped with its last view, its pages go straight back to the kernel."""
        self._arenas, self._arena_tokens = {}, 0
        self._lay_out(0)

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
        one row is copied per leaving sequence, not the whole batch. The arena is kept while any
        row lives and unmapped once none does.
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
        if not self.size and self._arena_tokens:
            self._release()
        return order

    # ---- one decode step -----------------------------------------------------------------------
    def step_views(self, tokens: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The live rows' buffers (views, no copy) and the attention mask for ``tokens`` more tokens per row
        (more than one: a speculative verify step, ``runtime/speculative.py``).

        Capacity grows in 64-token steps and shrinks once the longest row has left (each an in-place
        move of the live rows, at most once per 64 steps), so that the arena stays within the
        admitted reservations (``KVCacheManager``'s rectangular accounting) plus rounding. It was
        first kept tight for speed, when onnxruntime's GroupQueryAttention took time in proportion
        to the capacity (batch 16, 236 cached tokens: 26 ms per step at capacity 256, 35 at 512,
        52 at 1024); measured again with onnxruntime 1.31 and the mask as wide as the longest row,
        a 16-row step with 170 cached tokens took 34.2-34.9 ms at every capacity from 192 to 1024.
        A move costs ~13 ms at 16 rows of ~200 tokens (18 in a 48-request, 16-stream run, 1.2 % of
        its time): a policy that shrinks only when a joining row would otherwise grow the arena would
        save most of them.
        """
        needed = max(self.lengths) + tokens
        if self.capacity - needed >= 2 * GROWTH_QUANTUM:
            self._resize(self.size, round_up(needed))
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
