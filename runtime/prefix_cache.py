"""Automatic prefix caching: prompt KV kept in 16-token blocks keyed by the hash of the prefix they end.

As in vLLM's automatic prefix caching (and nano-vllm's block manager), block i of a prompt is keyed
by a chained hash, ``key(i) = H(key(i-1), tokens of block i)``, so one key names the whole prefix
up to the end of that block; the chain's root hashes the LoRA adapter name, because an adapter
changes every layer's keys and values and a base request must never reuse an adapter's blocks.

A new request takes the longest chain of cached blocks that matches its prompt, capped so that at
least one prompt token is left to prefill (the step needs its logits), starts its prefill past
from those blocks' KV and prefills only the rest. When its prefill ends, the full blocks of its
prompt are added to the cache.

Memory: blocks live in one slot pool (``BlockPool``): an anonymous memory map of ``max_blocks``
slots, each slot every past input's ``[1, kv_heads, 16, head_dim]`` side by side, so thousands of
blocks leave no heap fragmentation (measured: per-block numpy arrays left glibc's heap holding
freed holes). The pool is either *reserved* or *lazy*:

* reserved (``toolkit serve``; ``KVCacheManager.reserve_prefix_cache``): the whole pool is committed
  when the engine is made (``MAP_POPULATE``), as vLLM preallocates its KV cache from
  ``gpu_memory_utilization`` (https://docs.vllm.ai/en/stable/configuration/optimization/) and
  llama-server allocates its ``-c`` context at start. Evicted slots keep their pages and are
  simply overwritten when reused, so the resident set holds the pool from the first request on
  and does not creep up while the cache fills (measured before: +25 % RSS over a 10-minute soak,
  all of it the cache filling towards its cap). The pool is carved out of the KV budget: running
  requests reserve within the rest, and are never admitted by evicting cached blocks, which would
  free nothing.
* lazy (the engine's default, e.g. tests and ``toolkit bench``): the map costs address space only;
  a slot's pages become resident when a block is written into it and are handed back to the kernel
  (``madvise(MADV_DONTNEED)``) when it is evicted, and cached blocks count against the same budget
  as the running requests (``KVCacheManager.cached_blocks``), evicted before a request would wait.

Freed slots are reused most recently freed first. The running batch's rows are dense copies, so a
request still reserves its whole prompt + ``max_tokens``; ``max_blocks`` (``toolkit serve
--prefix-cache-share``) caps the cache. A request pins the blocks it matched from admission until
its prefill ends or it is dropped; unpinned blocks are evicted least recently used when admission
(lazy pool), the cap or a new block needs room. Touching a chain moves its deepest block to the
recent end first, so a parent is never evicted before its children and every cached block stays
reachable.
"""

from __future__ import annotations

import hashlib
import mmap
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from toolkit.runtime.kv_cache import BLOCK, KVCacheManager
from toolkit.runtime.native_memory import anonymous_map


@dataclass
class CachedBlock:
    """One block of a cached prefix: its chained key, tokens, pool slot and pin count.

    The KV views are made when asked for (``kv``), not kept: a dict of one view per past input
    (36 for the default model) per block was ~6 KB of Python objects, 6.4 MiB for a full cache
    (measured with tracemalloc under the soak).
    """

    key: bytes
    tokens: tuple[int, ...]
    pool: BlockPool
    slot: int = -1
    refs: int = 0

    @property
    def kv(self) -> dict[str, np.ndarray]:
        """``{name: [1, kv_heads, BLOCK, head_dim]}`` views of the block's slot."""
        return self.pool.views(self.slot)


class BlockPool:
    """``capacity`` fixed-size slots in one anonymous memory map; committed up front when ``reserve``.

    Slot ``i`` holds, for every past input ``name``, a ``[1, kv_heads, BLOCK, head_dim]`` array
    (``views(i)``). ``slot_bytes`` (the KV geometry's bytes per block) lets a reserved pool be
    mapped and populated before any request; the names and shapes are taken from the first past
    written (``ensure_layout``), which maps the pool anew only if its block size differs.
    """

    def __init__(self, capacity: int, slot_bytes: int = 0, reserve: bool = False):
        self.capacity = capacity
        self.reserve = reserve
        self.names: list[str] = []
        self.slot_bytes = slot_bytes
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._free: list[int] = []  # most recently freed last
        self._next = 0  # slots below this have been used at least once
        if reserve and slot_bytes:
            self._map = self._mapped(slot_bytes)

    def _mapped(self, slot_bytes: int) -> mmap.mmap:
        """The pool's own anonymous map, populated when reserved."""
        return anonymous_map(self.capacity * slot_bytes, populate=self.reserve)

    @property
    def resident_bytes(self) -> int:
        """The whole pool once reserved; otherwise 0 (a lazy pool's resident slots are the cache's held blocks)."""
        return self.capacity * self.slot_bytes if self.reserve and self._map is not None else 0

    def ensure_layout(self, past: dict[str, np.ndarray]) -> None:
        """Lay the pool out for ``past``'s inputs, head count, head size and dtype (once)."""
        if self._array is not None:
            return
        first = next(iter(past.values()))
        block_shape = (1, first.shape[1], BLOCK, first.shape[3])
        slot_bytes = len(past) * int(np.prod(block_shape)) * first.dtype.itemsize
        if self._map is None or slot_bytes != self.slot_bytes:  # lazy, or the geometry's guess was off
            if self._map is not None:
                self._map.close()
            self._map, self.slot_bytes = self._mapped(slot_bytes), slot_bytes
        self.names = list(past)
        array = np.frombuffer(self._map, first.dtype, self.capacity * slot_bytes // first.dtype.itemsize)
        self._array = array.reshape(self.capacity, len(self.names), *block_shape)

    def take(self) -> int:
        """A free slot (the cache holds fewer blocks than ``capacity``)."""
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def views(self, slot: int) -> dict[str, np.ndarray]:
        return {name: self._array[slot, j] for j, name in enumerate(self.names)}

    def gather(self, slots: list[int]) -> dict[str, np.ndarray]:
        """Slots ``slots`` side by side along the tokens, ``{name: [1, kv_heads, len(slots) * BLOCK, head_dim]}`` (a copy)."""
        return {name: np.concatenate([self._array[slot, j] for slot in slots], axis=2) for j, name in enumerate(self.names)}

    def release(self, slot: int) -> None:
        """Free ``slot``; a lazy pool returns its whole pages to the kernel (they read as zeros when next used),
        a reserved one keeps them for the next block (which overwrites the whole slot)."""
        if not self.reserve:
            page = mmap.PAGESIZE
            start = -(-slot * self.slot_bytes // page) * page
            stop = (slot + 1) * self.slot_bytes // page * page
            if stop > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)
        self._free.append(slot)


def block_keys(prompt_ids: tuple[int, ...], adapter: str | None, blocks: int) -> list[bytes]:
    """The chained keys of the first ``blocks`` full blocks of ``prompt_ids`` under ``adapter``."""
    keys = []
    parent = hashlib.blake2b(f"adapter:{adapter or ''}".encode(), digest_size=16).digest()
    for i in range(blocks):
        tokens = np.asarray(prompt_ids[i * BLOCK : (i + 1) * BLOCK], np.int64).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixMatch:
    """The blocks a request matched (pinned until released) and the tokens they cover."""

    blocks: list[CachedBlock] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK


class PrefixCache:
    """Hash → block store with pin counts and LRU eviction, accounted in ``kv.cached_blocks``."""

    def __init__(self, kv: KVCacheManager, max_blocks: int | None = None):
        self.kv = kv
        self.max_blocks = min(kv.total_blocks, kv.prefix_cache_blocks if max_blocks is None else max_blocks)
        self.pool = BlockPool(self.max_blocks, kv.block_bytes, reserve=kv.reserve_prefix_cache)
        self.blocks: OrderedDict[bytes, CachedBlock] = OrderedDict()  # front: evicted first
        self.evicted = 0  # blocks evicted since start
        kv.prefix_cache = self

    # ---- accounting (read by KVCacheManager) -------------------------------------------------
    @property
    def held_blocks(self) -> int:
        return len(self.blocks)

    @property
    def reserved(self) -> bool:
        """Whether the pool was committed up front (and carved out of the KV budget)."""
        return self.pool.reserve

    @property
    def held_bytes(self) -> int:
        """Resident bytes of the cache: the whole pool once reserved, else the held blocks' slots."""
        return self.pool.resident_bytes or len(self.blocks) * self.pool.slot_bytes

    @property
    def evictable_blocks(self) -> int:
        return sum(1 for b in self.blocks.values() if b.refs == 0)

    def evict(self, count: int) -> int:
        """Drop up to ``count`` unpinned blocks, least recently used first; returns how many."""
        victims = []
        for key, block in self.blocks.items():
            if len(victims) == count:
                break
            if block.refs == 0:
                victims.append(key)
        for key in victims:
            self.pool.release(self.blocks.pop(key).slot)
        self.evicted += len(victims)
        return len(victims)

    def _touch(self, chain: list[CachedBlock]) -> None:
        for block in reversed(chain):  # deepest first: parents end up more recent than their children
            self.blocks.move_to_end(block.key)

    # ---- requests ------------------------------------------------------------------------------
    def match(self, prompt_ids: tuple[int, ...], adapter: str | None) -> PrefixMatch:
        """Pin the longest cached chain of ``prompt_ids``'s full blocks, leaving at least one token to prefill."""
        usable = (len(prompt_ids) - 1) // BLOCK
        chain = []
        for i, key in enumerate(block_keys(prompt_ids, adapter, usable)):
            block = self.blocks.get(key)
            if block is None or block.tokens != tuple(prompt_ids[i * BLOCK : (i + 1) * BLOCK]):
                break
            chain.append(block)
        for block in chain:
            block.refs += 1
        self._touch(chain)
        return PrefixMatch(chain)

    def release(self, match: PrefixMatch) -> None:
        """Unpin a match's blocks (idempotent: the match is emptied)."""
        for block in match.blocks:
            block.refs -= 1
        match.blocks = []

    @staticmethod
    def past(match: PrefixMatch) -> dict[str, np.ndarray]:
        """The matched prefix's KV as a prefill past, ``{name: [1, kv_heads, tokens, head_dim]}`` (a copy)."""
        return match.blocks[0].pool.gather([b.slot for b in match.blocks])

    def insert(self, prompt_ids: tuple[int, ...], adapter: str | None, past: dict[str, np.ndarray]) -> int:
        """Cache the full blocks of a prefilled prompt from its ``past`` (left-aligned); returns blocks added.

        Blocks already cached are only touched; new ones need room in the KV budget, made by
        evicting unpinned blocks, and insertion stops at the first block that finds none.
        """
        chain: list[CachedBlock] = []
        added = 0
        try:
            for i, key in enumerate(block_keys(prompt_ids, adapter, len(prompt_ids) // BLOCK)):
                block = self.blocks.get(key)
                if block is None:
                    if not self._room_for_one():
                        break
                    window = slice(i * BLOCK, (i + 1) * BLOCK)
                    self.pool.ensure_layout(past)
                    slot = self.pool.take()
                    kv = self.pool.views(slot)
                    for name, array in past.items():
                        kv[name][...] = array[:1, :, window]
                    block = self.blocks[key] = CachedBlock(key, tuple(prompt_ids[window]), self.pool, slot)
                    added += 1
                block.refs += 1  # pinned while the walk goes on, so making room never evicts the chain
                chain.append(block)
        finally:
            for block in chain:
                block.refs -= 1
            self._touch(chain)
        return added

    def _room_for_one(self) -> bool:
        """A pool slot and budget room for one more block, evicting unpinned blocks for either."""
        if len(self.blocks) >= self.max_blocks and not self.evict(1):
            return False
        return self.kv.make_room_for_cached(1)
