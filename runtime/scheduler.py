"""In-flight batching policy: which requests join, how much prompt to prefill this step, who decodes.

A step decodes one token for every running sequence and spends what is left of the
``max_num_tokens`` budget on prompt chunks of admitted requests (chunked prefill), so a long prompt
never stalls the running batch for more than one budget's worth of work.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from toolkit.runtime.kv_cache import KVCacheManager
from toolkit.runtime.sequence import Sequence, SequenceGroup


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits: rows decoded together, tokens per step, queue length before Overloaded."""

    max_batch_size: int = 16
    max_num_tokens: int = 512
    max_waiting: int = 256

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

    def _rows_committed(self) -> int:
        return len(self.running) + sum(len(g.sequences) for g in self.prefilling)

    def _admit(self) -> None:
        while self.waiting:
            group = self.waiting[0]
            rows = len(group.sequences)
            if self._rows_committed() + rows > self.config.max_batch_size:
                return
            if not self.kv.can_allocate(group.reserved_tokens, rows):
                return
            for seq in group.sequences:
                self.kv.allocate(seq.seq_id, group.reserved_tokens)
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
