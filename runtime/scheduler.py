"""In-flight batching policy: which requests join, how much prompt to prefill this step, who decodes.

A step decodes one token for every running sequence and spends what is left of the
``max_num_tokens`` budget on prompt chunks of admitted requests (chunked prefill), so a long prompt
never stalls the running batch for more than one budget's worth of work.

With ``prefix_cache`` on (the default), an admitted request starts from the longest cached
block-aligned prefix of its prompt (``runtime/prefix_cache.py``) and prefills only the rest.

With ``step_budget_ms`` set, the prompt chunks of a step that also decodes are cut to what fits in
that time after the decode, as predicted by ``runtime/step_cost.py`` from the steps already run, so
a running stream waits about one budget between tokens however many prompts arrive (the token
budget alone let a step carry ~500 prompt tokens, ~0.5 s on a 2-core CPU, between two tokens of
every stream). At least ``min_prefill_chunk`` prompt tokens still run every step, so prefill never
starves; with nothing decoding, prefill takes the whole token budget.

With ``queued_step_budget_ms`` set, a step that decodes while requests wait for a free row (the
batch is full) may take that long instead: the server is then throughput-bound, and longer steps
carry longer prompt chunks, which cost less per token (each chunk is a run of the whole model at
batch 1, its weights read again), so the rows freed by finished requests refill sooner. The streams
already running wait longer between tokens, still far less than in a server that prefills whole
prompts between their tokens.

With ``waiting_served_ratio`` set (text-generation-inference's launcher option of that name and
meaning, https://huggingface.co/docs/text-generation-inference/basic_tutorials/launcher#waitingservedratio),
a step pauses the running rows and spends the whole token budget on prompts when the admitted
requests still prefilling have at least that many times as many rows as are decoding: a burst of
new requests (16 clients starting together) then reaches its first tokens in a few large steps
instead of trickling through time-budgeted chunks, at the price of one longer gap for the few
streams already running. Two paused steps never follow each other, and a pause runs only when it
finishes at least one prompt, so a long prompt never stalls the running streams for more than one
step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from toolkit.runtime.kv_cache import KVCacheManager
from toolkit.runtime.prefix_cache import PrefixCache
from toolkit.runtime.sequence import Sequence, SequenceGroup
from toolkit.runtime.step_cost import StepCostModel


#: Default model, int8 gqa, 2 AVX-512 VNNI cores: a decode step of 16 rows takes ~40 ms and a prompt
#: chunk ~12 ms + ~0.6 ms per token (benchmarks/itl_budget.py --chunks), and a step's time varies by
#: about +-10-25 % around the cost model's prediction on this VM. Over HTTP at 16 streams
#: (itl_budget.py --peer, two rounds, 2026-12-05): budget 100 ms -> ITL p99 127 ms, 273 tok/s;
#: 85 -> 102 ms, 245 tok/s; 75 -> 95 ms, 240 tok/s; llama-server 109 ms (95-118 by round), 156 tok/s.
#: 75 ms is the largest budget measured that keeps ITL p99 under llama-server's (issue 13); TTFT p50
#: stays 0.4-1.1 s at 16 streams against llama-server's 1.9-2.6 s (three runs), not always under half of
#: it. Chunks under 32 tokens cost 1.5-6x more per token than long ones (the per-run weight read
#: dominates), hence the floor.
#: With our attention operator and a float16 cache (a 16-row decode step ~27 ms), ITL p99 at 75 ms was
#: 82.8-90.2 ms against llama-server's 88.1-94.2 (one of five runs above it); 65 ms gave 76.1 / 79.7
#: against 87.5 / 88.8 at 2.24x / 2.04x the throughput (75 ms: 2.06x / 2.10x; benchmarks/llama_cpp_peer.py
#: --levels 16 --serve-arg=--step-budget-ms=B, alternated, 2026-12-05): the margin is kept.
DEFAULT_STEP_BUDGET_MS: float | None = 65.0
DEFAULT_MIN_PREFILL_CHUNK = 32
#: Side by side with llama-server (benchmarks/llama_cpp_peer.py --levels 16,32 --serve-arg=--waiting-served-ratio=R,
#: four runs R = 0, 2, 2, 0, 2026-12-05, 2 AVX-512 VNNI cores): at 16 streams 279 / 289 tok/s and TTFT p50 1.2 / 1.0 s
#: with 2 against 224 / 233 tok/s and 1.7 / 1.7 s with 0 (ITL p99 97-100 against 93-98 ms); at 32 streams 296 / 299
#: against 248 / 267 tok/s, for TTFT p50 3.4-3.7 against 1.6-2.5 s (llama-server's: 4.5-5.0 s).
DEFAULT_WAITING_SERVED_RATIO: float | None = 2.0
#: 64 streams, 32 rows, the other 32 queued (benchmarks/llama_cpp_peer.py --levels 64, four runs alternated, 2026-12-05,
#: 2 AVX-512 VNNI cores): 325 / 344 tok/s with 150 ms against 304 / 321 with 75 ms (llama-server: 184-186), for ITL
#: p99 188 ms against 137 / 120 (llama-server: 1.8-2.0 s); the in-process trace (64 clients) took 42-45 s instead of 47-54 s.
#: Below 33 streams nothing waits for a row, so nothing changes there.
DEFAULT_QUEUED_STEP_BUDGET_MS: float | None = 150.0


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits: rows decoded together, tokens per step, queue length before Overloaded; prefix caching on/off.

    ``step_budget_ms``: model time a step that decodes may take, prompt chunks included (None or 0:
    the token budget alone). ``min_prefill_chunk``: prompt tokens a step runs even when the budget
    has no room left (measured: smaller chunks cost several times more per token).
    ``waiting_served_ratio``: prompts-only steps for a burst of new requests (module docstring; None or
    0: never). ``queued_step_budget_ms``: the step budget while requests wait for a free row (module
    docstring; None or 0: ``step_budget_ms`` then too); it applies only where ``step_budget_ms`` is set.

    ``max_batch_size`` (``toolkit serve --max-batch-size``) 32: 32 streams over HTTP on the default
    model (int8 gqa, 2 AVX-512 VNNI cores, 108-token prompts, 128 tokens, two rounds alternated
    against 16) got TTFT p50 3.0 / 3.8 s instead of 8.7 / 9.5 s (llama-server with a slot per
    stream: 3.9-4.9 s), 271 instead of 230 tok/s (round 2), for ITL p99 132 / 160 ms instead of
    107 / 99 ms (llama-server: 177-212 ms); at 16 streams or fewer nothing changes.
    """

    max_batch_size: int = 32
    max_num_tokens: int = 512
    max_waiting: int = 256
    prefix_cache: bool = True
    step_budget_ms: float | None = DEFAULT_STEP_BUDGET_MS
    min_prefill_chunk: int = DEFAULT_MIN_PREFILL_CHUNK
    waiting_served_ratio: float | None = DEFAULT_WAITING_SERVED_RATIO
    queued_step_budget_ms: float | None = DEFAULT_QUEUED_STEP_BUDGET_MS

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_num_tokens <= self.max_batch_size or self.max_waiting < 0:
            raise ValueError("need max_batch_size >= 1, max_num_tokens > max_batch_size, max_waiting >= 0")
        if ((self.step_budget_ms or 0) < 0 or (self.queued_step_budget_ms or 0) < 0 or self.min_prefill_chunk < 1
                or (self.waiting_served_ratio or 0) < 0):
            raise ValueError("need step_budget_ms and queued_step_budget_ms >= 0 (0 or None: off), min_prefill_chunk >= 1 "
                             "and waiting_served_ratio >= 0 (0 or None: off)")


@dataclass
class StepPlan:
    """One step's work: prompt chunks ``(group, start, stop)`` and whether the batch decodes.

    ``rows`` and ``context`` (the longest row's tokens) describe the decode for the cost model.
    """

    prefill: list[tuple[SequenceGroup, int, int]] = field(default_factory=list)
    decode: bool = False
    rows: int = 0
    context: int = 0

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
        self.cost = StepCostModel()
        self.paused = False
        """Whether the last planned step paused the running rows for prompts (``waiting_served_ratio``)."""

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
        """Admit what fits, then plan the decode and prompt chunks within the token and time budgets."""
        self._admit()
        self.paused = self._pause_for_prompts()
        rows = 0 if self.paused else len(self.running)
        timed = bool(self.config.step_budget_ms and rows)
        context = max(len(s.group.prompt_ids) + len(s.output_ids) for s in self.running) if timed else 0
        plan = StepPlan(decode=bool(rows), rows=rows, context=context)
        budget = self.config.max_num_tokens - rows
        seconds = self._prefill_seconds(rows, context) if timed else None
        for group in self.prefilling:
            chunk = min(group.prefill_remaining, budget)
            if seconds is not None:
                fits = self.cost.chunk_tokens_within(seconds, group.prefilled)
                floor = self.config.min_prefill_chunk if not plan.prefill else 0  # progress every step
                chunk = min(chunk, max(fits, floor))
                seconds -= self.cost.chunk_seconds(chunk, group.prefilled)
            if chunk <= 0:
                break
            plan.prefill.append((group, group.prefilled, group.prefilled + chunk))
            budget -= chunk
        return plan

    def _pause_for_prompts(self) -> bool:
        """Whether this step runs prompts only (module docstring: ``waiting_served_ratio``)."""
        ratio, rows = self.config.waiting_served_ratio, len(self.running)
        if not ratio or not rows or self.paused or not self.prefilling:
            return False
        if self.prefilling[0].prefill_remaining > self.config.max_num_tokens:
            return False
        return sum(len(group.sequences) for group in self.prefilling) >= ratio * rows

    def step_budget_ms(self) -> float | None:
        """This step's model-time budget: ``queued_step_budget_ms`` while requests still wait after admission
        (no free row, or no KV room for them), else ``step_budget_ms``; None or 0: the token budget alone."""
        config = self.config
        if config.step_budget_ms and self.waiting and config.queued_step_budget_ms:
            return config.queued_step_budget_ms
        return config.step_budget_ms

    def _prefill_seconds(self, rows: int, context: int) -> float | None:
        """Time left for prompt chunks after this step's decode; None: the token budget alone applies."""
        if not self.cost.ready:  # the first steps teach the cost model
            return None
        return self.step_budget_ms() / 1000 - self.cost.decode_seconds(rows, context)

    def observe_step(self, plan: StepPlan, prefill_s: float, decode_s: float, tokens_per_row: int = 1) -> None:
        """Teach the cost model what ``plan``'s prompt chunks and decode took (``tokens_per_row`` > 1: a verify step)."""
        self.cost.observe_prefill([(stop - start, start) for _, start, stop in plan.prefill], prefill_s)
        if plan.decode:
            self.cost.observe_decode(plan.rows, plan.context, decode_s, tokens_per_row)

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
