"""KV cache: token accounting against a memory budget, and the running batch's padded cache arrays.

``KVCacheManager`` reserves, per sequence, room for its prompt plus ``max_tokens`` in blocks of
``BLOCK`` tokens, so an admitted sequence can always finish; admission waits while the budget is
used up and a request that could never fit is refused. Blocks held by the prefix cache
(``runtime/prefix_cache.py``) count against the same budget, apart from the reservations
(``cached_blocks``), and unpinned ones are evicted before a request would have to wait.

``BatchKV`` holds the decode batch's cache as one array per past input, ``[batch, kv_heads, length,
head_dim]``, right-aligned: row i's tokens sit in the last ``lengths[i]`` columns and the attention
mask hides the left padding. The exported graph returns ``present = concat(past, new)``, which
becomes the next step's past as is; rows are only copied when a sequence joins or leaves.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

BLOCK = 16


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup (v2) limit when that is lower (a container's share)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def default_kv_budget_bytes(bytes_per_token: int, context_length: int, memory_bytes: int | None = None) -> int:
    """The KV budget when none is given: a tenth of the machine's memory, within [one full-context sequence, 16 GiB].

    A tenth leaves the weights, onnxruntime's working memory and neighbours most of the machine
    (24 GiB: 2.4 GiB, 65k tokens of the default model); one full-context sequence is the floor
    so every request the context allows can run (the default model: 32,768 × 36 KiB = 1.1 GiB).
    """
    memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
    return min(max(memory // 10, bytes_per_token * context_length), 16 << 30)


@dataclass(frozen=True)
class KvGeometry:
    """Bytes per cached token, from the manifest's kv_layout."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of_layout(cls, layout: dict) -> KvGeometry:
        """The geometry of a manifest's ``kv_layout``."""
        return cls(**{k: layout[k] for k in ("num_layers", "num_kv_heads", "head_dim", "dtype")})

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize


class KVCacheManager:
    """Token-block reservations per sequence against a fixed capacity.

    ``rectangular``: the cache is one slot per sequence, each as long as the longest reservation
    (``SharedKV``), so a set of reservations costs ``count × longest`` rather than their sum.
    ``prefix_cache_share``: the part of the budget the prefix cache may hold at most.
    ``reserve_prefix_cache``: the prefix cache commits its whole share up front
    (``runtime/prefix_cache.py``); the share is then carved out of the budget (reservations fit in
    the rest and never evict cached blocks, which would free no memory), so the resident KV stays
    within the budget. Otherwise unpinned cached blocks are evicted for reservations.
    """

    def __init__(self, geometry: KvGeometry, budget_bytes: int, rectangular: bool = False,
                 prefix_cache_share: float = 1.0, reserve_prefix_cache: bool = False):
        self.geometry = geometry
        self.total_blocks = max(1, budget_bytes // (geometry.bytes_per_token * BLOCK))
        self.budget_bytes = self.total_blocks * self.block_bytes
        self.rectangular = rectangular
        self.prefix_cache_blocks = min(self.total_blocks, int(self.total_blocks * prefix_cache_share))
        """The most blocks the prefix cache may hold (``toolkit serve --prefix-cache-share``)."""
        self.reserve_prefix_cache = reserve_prefix_cache
        self._reserved: dict[str, int] = {}
        self.prefix_cache = None  # a PrefixCache registers itself here

    @property
    def block_bytes(self) -> int:
        return self.geometry.bytes_per_token * BLOCK

    @property
    def cached_blocks(self) -> int:
        """Blocks held by the prefix cache (not in ``used_blocks``, which counts reservations)."""
        return self.prefix_cache.held_blocks if self.prefix_cache is not None else 0

    @property
    def _cache_share_blocks(self) -> int:
        """Blocks the prefix cache takes from the budget: its whole pool when reserved, else the blocks it holds."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        return cache.max_blocks if cache.reserved else cache.held_blocks

    @property
    def cached_tokens(self) -> int:
        return self.cached_blocks * BLOCK

    @property
    def total_tokens(self) -> int:
        return self.total_blocks * BLOCK

    def _footprint(self, reservations: list[int]) -> int:
        if self.rectangular and reservations:
            return len(reservations) * max(reservations)
        return sum(reservations)

    @property
    def used_blocks(self) -> int:
        return self._footprint(list(self._reserved.values()))

    @property
    def used_tokens(self) -> int:
        return self.used_blocks * BLOCK

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return math.ceil(tokens / BLOCK)

    @property
    def reservable_tokens(self) -> int:
        """Tokens the running requests may reserve in an empty cache: the budget less a reserved prefix cache's pool."""
        cache = self.prefix_cache
        return (self.total_blocks - (cache.max_blocks if cache is not None and cache.reserved else 0)) * BLOCK

    def can_ever_fit(self, tokens: int) -> bool:
        """Whether ``tokens`` fit in an empty cache."""
        return self.blocks_for(tokens) * BLOCK <= self.reservable_tokens

    def can_allocate(self, tokens: int, count: int = 1) -> bool:
        """Whether ``count`` sequences of ``tokens`` tokens each fit now (next to the cached blocks)."""
        needed = self._footprint([*self._reserved.values(), *[self.blocks_for(tokens)] * count])
        return needed + self._cache_share_blocks <= self.total_blocks

    def make_room(self, tokens: int, count: int = 1) -> bool:
        """``can_allocate``, evicting unpinned cached blocks when that makes it true (and only then)."""
        needed = self._footprint([*self._reserved.values(), *[self.blocks_for(tokens)] * count])
        return self._evict_for(needed)

    def make_room_for_cached(self, blocks: int) -> bool:
        """Whether the prefix cache may add ``blocks`` blocks, evicting its unpinned ones if needed
        (a reserved pool's room is its own: the cache's cap alone limits it)."""
        if self.prefix_cache is not None and self.prefix_cache.reserved:
            return True
        return self._evict_for(self.used_blocks + blocks)

    def _evict_for(self, needed: int) -> bool:
        excess = needed + self._cache_share_blocks - self.total_blocks
        if excess <= 0:
            return True
        cache = self.prefix_cache
        if cache is None or cache.reserved or excess > cache.evictable_blocks:
            return False
        cache.evict(excess)
        return True

    def allocate(self, seq_id: str, tokens: int) -> None:
        """Reserve room for ``tokens`` tokens of sequence ``seq_id`` (check ``can_allocate`` first)."""
        if seq_id in self._reserved:
            raise ValueError(f"sequence {seq_id} already holds cache")
        if not self.make_room(tokens):
            raise MemoryError("KV cache budget exhausted")
        self._reserved[seq_id] = self.blocks_for(tokens)

    def free(self, seq_id: str) -> None:
        """Release a sequence's reservation (no-op when it holds none)."""
        self._reserved.pop(seq_id, None)


class BatchKV:
    """The decode batch's right-aligned KV arrays and attention mask."""

    def __init__(self, names: list[str], num_kv_heads: int, head_dim: int, dtype):
        self.names = names
        self.shape_tail = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.past = {n: np.zeros((0, num_kv_heads, 0, head_dim), dtype) for n in names}
        self.mask = np.zeros((0, 0), np.int64)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def add_rows(self, rows: dict[str, np.ndarray], lengths: list[int]) -> None:
        """Append rows whose cache is ``rows[name]`` ``[k, heads, l, dim]`` (right-aligned, ``lengths`` real).

        A single source row is repeated for every length given (``n`` > 1 sequences sharing a prefill).
        """
        new_len = max(self.length, next(iter(rows.values())).shape[2])
        for name in self.names:
            source = rows[name].astype(self.dtype, copy=False)
            if source.shape[0] != len(lengths):
                source = np.repeat(source, len(lengths), axis=0)
            self.past[name] = np.concatenate([_left_pad(self.past[name], new_len), _left_pad(source, new_len)])
        row_mask = np.zeros((len(lengths), new_len), np.int64)
        for i, n in enumerate(lengths):
            row_mask[i, new_len - n :] = 1
        self.mask = np.concatenate([_left_pad(self.mask, new_len, axis=1), row_mask])

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Drop every row not in ``keep`` (in order), then trim columns no remaining row uses; returns ``keep``."""
        index = np.asarray(keep, dtype=np.int64)
        used = self.mask[index].any(axis=0) if len(keep) else np.zeros(0, bool)
        start = int(np.argmax(used)) if used.any() else self.length
        for name in self.names:
            self.past[name] = np.ascontiguousarray(self.past[name][index, :, start:])
        self.mask = np.ascontiguousarray(self.mask[index, start:])
        return keep

    def step_inputs(self, tokens: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Past arrays and the attention mask for ``tokens`` more tokens per row (> 1: a speculative verify)."""
        mask = np.concatenate([self.mask, np.ones((self.size, tokens), np.int64)], axis=1)
        return self.past, mask

    def rollback(self, kept: list[int], fed: int) -> None:
        """After a ``fed``-token verify step, row i keeps only the first ``kept[i]`` of them.

        The columns no row keeps are cut off the end; a row that kept fewer than the most is
        shifted right by the difference (one row's copy), so every row stays right-aligned and
        contiguous: no holes in the mask, which a sliding-window graph would count as positions.
        """
        most = max(kept)
        end = self.length - (fed - most)
        if end < self.length:
            for name in self.names:
                self.past[name] = np.ascontiguousarray(self.past[name][:, :, :end])
            self.mask = np.ascontiguousarray(self.mask[:, :end])
        for row, k in enumerate(kept):
            shift = most - k
            if shift:
                for name in self.names:
                    past = self.past[name]
                    past[row, :, shift:] = past[row, :, : end - shift].copy()
                self.mask[row, shift:] = self.mask[row, : end - shift].copy()
                self.mask[row, :shift] = 0

    def accept_step(self, present: dict[str, np.ndarray], mask: np.ndarray) -> None:
        """Adopt the graph's present arrays (past + the new token) as the cache."""
        self.past = present
        self.mask = mask


def _left_pad(array: np.ndarray, length: int, axis: int = 2) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)
