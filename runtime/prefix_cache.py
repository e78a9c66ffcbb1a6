"""Automatic prefix caching: prompt KV kept in 16-token blocks keyed by the hash of the prefix they end.

As in vLLM's automatic prefix caching (and nano-vllm's block manager), block i of a prompt is keyed
by a chained hash, ``key(i) = H(key(i-1), tokens of block i)``, so one key names the whole prefix
up to the end of that block; the chain's root hashes the LoRA adapter name, because an adapter
changes every layer's keys and values and a base request must never reuse an adapter's blocks.

A new request takes the longest chain of cached blocks that matches its prompt, capped so that at
least one prompt token is left to prefill (the step needs its logits), starts its prefill past
from those blocks' KV and prefills only the rest. When its prefill ends, the full blocks of its
prompt are added to the cache.

Memory: a block holds its own copy of the KV (``[1, kv_heads, 16, head_dim]`` per past input); the
running batch's rows are dense copies too, so a request still reserves its whole prompt +
``max_tokens`` and cached blocks are counted *in addition* against the same budget
(``KVCacheManager.cached_blocks``). A request pins the blocks it matched from admission until its
prefill ends or it is dropped; unpinned blocks are evicted least recently used when admission or
a new block needs room. Touching a chain moves its deepest block to the recent end first, so a
parent is never evicted before its children and every cached block stays reachable.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from toolkit.runtime.kv_cache import BLOCK, KVCacheManager


@dataclass
class CachedBlock:
    """One block of a cached prefix: its chained key, tokens, KV arrays and pin count."""

    key: bytes
    tokens: tuple[int, ...]
    kv: dict[str, np.ndarray]
    refs: int = 0


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

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.blocks: OrderedDict[bytes, CachedBlock] = OrderedDict()  # front: evicted first
        self.evicted = 0  # blocks evicted since start
        kv.prefix_cache = self

    # ---- accounting (read by KVCacheManager) -------------------------------------------------
    @property
    def held_blocks(self) -> int:
        return len(self.blocks)

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
            del self.blocks[key]
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
        names = match.blocks[0].kv.keys()
        return {name: np.concatenate([b.kv[name] for b in match.blocks], axis=2) for name in names}

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
                    if not self.kv.make_room_for_cached(1):
                        break
                    window = slice(i * BLOCK, (i + 1) * BLOCK)
                    kv = {name: np.ascontiguousarray(array[:1, :, window]) for name, array in past.items()}
                    block = self.blocks[key] = CachedBlock(key, tuple(prompt_ids[window]), kv)
                    added += 1
                block.refs += 1  # pinned while the walk goes on, so making room never evicts the chain
                chain.append(block)
        finally:
            for block in chain:
                block.refs -= 1
            self._touch(chain)
        return added
