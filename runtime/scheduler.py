"""In-flight batching policy: which requests join, how much prompt to prefill this step, who decodes.

A step decodes one token for every running sequence and spends what is left of the
``max_num_tokens`` budget on prompt chunks of admitted requests (chunked prefill), so a long prompt
never stalls the running batch for more than one budget's worth of work.

With ``prefix_cache`` on (the default), an admitted request starts from the longest cached
block-aligned prefix of its prompt (``runtime/prefix_cache.py``) and prefills only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from toolkit.runtime.kv_cache import KVCacheManager
from toolkit.runtime.prefix_cache import PrefixCache
from toolkit.runtime.sequence import Sequence, SequenceGroup


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits: rows decoded together, tokens per step, queue length before Overloaded; prefix caching on/off."""

    max_batch_size: int = 16
    max_num_tokens: int = 512
    max_waiting: int = 256
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_num_tokens <= self.max_batch_size or self.max_waiting < 0:
            raise ValueError("need max_batch_size >= 1, max_num_tokens > max_batch_size, max_waiting >= 0")


@dataclass
class StepPlan:
    """One step's work: prompt chunks ``(group, start, stop)`` and whether the batch decodes."""

    prefill: list[tuple[SequenceGroup, int, int]] = field(default_factory=list)
    decode: bool = False

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Owns the waiting queue, the admitted (prefilling) requests and the running rows."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[SequenceGroup] = deque()
        self.prefilling: list[SequenceGroup] = []
        self.running: list[Sequence] = []
        self.prefix_cache = PrefixCache(kv) if config.prefix_cache else None

    def _rows_committed(self) -> int:
        return len(self.running) + sum(len(g.sequences) for g in self.prefilling)

    def _admit(self) -> None:
        while self.waiting:
            group = self.waiting[0]
            rows = len(group.sequences)
            if self._rows_committed() + rows > self.config.max_batch_size:
                return
            cache = self.prefix_cache
            match = cache.match(group.prompt_ids, group.request.adapter) if cache is not None else None
            fits = self.kv.make_room(group.reserved_tokens, rows)  # the matched blocks are pinned: kept
            if not fits and match is not None:  # unless they are what stands in the way: then admit without them
                cache.release(match)
                match = None
                fits = self.kv.make_room(group.reserved_tokens, rows)
            if not fits:
                return
            for seq in group.sequences:
                self.kv.allocate(seq.seq_id, group.reserved_tokens)
            if match is not None and match.blocks:
                group.prefix, group.prefill_past = match, cache.past(match)
                group.prefilled = group.cached_tokens = match.tokens
            self.prefilling.append(self.waiting.popleft())

    def schedule(self) -> StepPlan:
        """Admit what fits, then plan prompt chunks within the token budget and the decode."""
        self._admit()
        plan = StepPlan(decode=bool(self.running))
        budget = self.config.max_num_tokens - len(self.running)
        for group in self.prefilling:
            chunk = min(group.prefill_remaining, budget)
            if chunk <= 0:
                break
            plan.prefill.append((group, group.prefilled, group.prefilled + chunk))
            budget -= chunk
        return plan

    def prefill_done(self, group: SequenceGroup) -> None:
        """Cache the full blocks of ``group``'s prefilled prompt and unpin the blocks it matched."""
        if self.prefix_cache is None:
            return
        self.prefix_cache.insert(group.prompt_ids, group.request.adapter, group.prefill_past)
        self._unpin(group)

    def _unpin(self, group: SequenceGroup) -> None:
        if self.prefix_cache is not None and group.prefix is not None:
            self.prefix_cache.release(group.prefix)
            group.prefix = None

    def release(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's cache reservation."""
        self.kv.free(seq.seq_id)

    def drop_group(self, group: SequenceGroup) -> None:
        """Remove a request from the waiting or prefilling sets and free its cache."""
        if group in self.waiting:
            self.waiting.remove(group)
        if group in self.prefilling:
            self.prefilling.remove(group)
        for seq in group.sequences:
            self.release(seq)
        self._unpin(group)
