"""Unit tests of the batching policy (``runtime/scheduler.py``) and the KV cache accounting and
arrays (``runtime/kv_cache.py``: ``KVCacheManager``, ``BatchKV``), without a model.

The scheduler only reads ``sequences`` (each with a ``seq_id``), ``reserved_tokens``, ``prefilled``
and ``prefill_remaining`` of a request group, so the tests drive it with a small stand-in group and
play the engine loop's part by hand (advance ``prefilled``, move finished prefills to ``running``,
release sequences, drop aborted or failed groups), as ``OnnxEngine`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from toolkit.runtime.kv_cache import BLOCK, BatchKV, KVCacheManager, KvGeometry
from toolkit.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan

#: 2 (k, v) x 1 layer x 1 head x 2 dims x 4 bytes = 16 bytes per token; one block is 256 bytes.
GEOMETRY = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32")
BLOCK_BYTES = GEOMETRY.bytes_per_token * BLOCK


def kv_manager(blocks: int, rectangular: bool = False) -> KVCacheManager:
    return KVCacheManager(GEOMETRY, blocks * BLOCK_BYTES, rectangular=rectangular)


@dataclass
class Seq:
    seq_id: str


@dataclass
class Group:
    """What the scheduler reads of a ``SequenceGroup``: rows, reservation and prefill progress."""

    request_id: str
    prompt_len: int
    max_tokens: int = 0
    n: int = 1
    prefilled: int = 0
    sequences: list[Seq] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sequences = [Seq(f"{self.request_id}:{i}") for i in range(self.n)]

    @property
    def prefill_remaining(self) -> int:
        return self.prompt_len - self.prefilled

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_tokens

    def __eq__(self, other) -> bool:  # identity, like the engine's groups in list.remove / `in`
        return self is other

    __hash__ = object.__hash__


def scheduler(max_batch_size: int = 4, max_num_tokens: int = 32, kv_blocks: int = 100) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, prefix_cache=False,
                                     step_budget_ms=None, waiting_served_ratio=None),
                     kv_manager(kv_blocks))  # prefix caching: tests/test_prefix_cache.py; time budget and pauses: test_step_budget.py


def chunks(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(g.request_id, start, stop) for g, start, stop in plan.prefill]


def run_prefill(s: Scheduler, plan: StepPlan) -> None:
    """The engine's part after a step: advance prefills; a finished prefill joins the decode batch."""
    for group, _, stop in plan.prefill:
        group.prefilled = stop
        if group.prefill_remaining == 0:
            s.running.extend(group.sequences)
            s.prefilling.remove(group)


# ---- KVCacheManager ------------------------------------------------------------------------------


def test_geometry_bytes_per_token_counts_keys_and_values():
    assert KvGeometry(num_layers=2, num_kv_heads=4, head_dim=8, dtype="float16").bytes_per_token == 2 * 2 * 4 * 8 * 2
    assert GEOMETRY.bytes_per_token == 16 and BLOCK == 16


def test_capacity_is_whole_blocks_of_the_budget():
    assert kv_manager(10).total_blocks == 10 and kv_manager(10).total_tokens == 160
    assert KVCacheManager(GEOMETRY, 10 * BLOCK_BYTES + BLOCK_BYTES - 1).total_blocks == 10  # rounded down
    assert KVCacheManager(GEOMETRY, 0).total_blocks == 1  # never zero


def test_reservations_are_rounded_up_to_blocks():
    assert [KVCacheManager.blocks_for(t) for t in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_keep_exact_accounting():
    kv = kv_manager(10)
    assert (kv.used_blocks, kv.used_tokens) == (0, 0)
    kv.allocate("a", 17)
    assert (kv.used_blocks, kv.used_tokens) == (2, 32)
    kv.allocate("b", 16)
    assert kv.used_blocks == 3
    kv.free("a")
    assert kv.used_blocks == 1
    kv.free("a")  # a second free (finish after abort) is a no-op: never negative
    kv.free("never-allocated")
    assert kv.used_blocks == 1
    kv.free("b")
    assert (kv.used_blocks, kv.used_tokens) == (0, 0)


def test_a_sequence_holds_one_reservation():
    kv = kv_manager(10)
    kv.allocate("a", 40)
    with pytest.raises(ValueError, match="already holds"):
        kv.allocate("a", 1)
    assert kv.used_blocks == 3


def test_allocation_past_the_budget_is_refused_and_changes_nothing():
    kv = kv_manager(10)
    kv.allocate("a", 9 * BLOCK)
    assert kv.can_allocate(BLOCK) and not kv.can_allocate(BLOCK + 1) and not kv.can_allocate(BLOCK, count=2)
    with pytest.raises(MemoryError):
        kv.allocate("b", BLOCK + 1)
    assert kv.used_blocks == 9
    kv.allocate("b", BLOCK)
    assert kv.used_blocks == 10 == kv.total_blocks and not kv.can_allocate(1) and kv.can_allocate(0)


def test_can_ever_fit_is_about_an_empty_cache():
    kv = kv_manager(10)
    kv.allocate("a", 160)
    assert kv.can_ever_fit(160) and not kv.can_ever_fit(161) and not kv.can_allocate(1)


def test_rectangular_cache_costs_count_times_the_longest():
    rect, flat = kv_manager(10, rectangular=True), kv_manager(10)
    for kv in (rect, flat):
        kv.allocate("short", 16)  # 1 block
        kv.allocate("long", 64)  # 4 blocks
    assert (rect.used_blocks, flat.used_blocks) == (8, 5)
    assert flat.can_allocate(16) and not rect.can_allocate(16)  # 3 x 4 = 12 > 10
    assert rect.can_allocate(0) is False  # a third slot, however short, is as long as the longest
    rect.free("long")
    assert rect.used_blocks == 1 and rect.can_allocate(16, count=9) and not rect.can_allocate(16, count=10)


def test_churn_leaks_nothing():
    kv = kv_manager(20)
    rng = np.random.default_rng(0)
    held: set[str] = set()
    for i in range(500):
        if held and (rng.random() < 0.5 or not kv.can_allocate(40)):
            kv.free(held.pop())
        else:
            kv.allocate(f"s{i}", int(rng.integers(1, 41)))
            held.add(f"s{i}")
        assert 0 <= kv.used_blocks <= kv.total_blocks
    for seq_id in held:
        kv.free(seq_id)
    assert kv.used_blocks == 0


# ---- Scheduler: configuration and admission ------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_batch_size": 4, "max_num_tokens": 4},
                                    {"max_waiting": -1}])
def test_config_rejects_impossible_limits(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


def test_config_smallest_valid_limits():
    assert SchedulerConfig(max_batch_size=1, max_num_tokens=2, max_waiting=0).max_num_tokens == 2


def test_nothing_to_do_is_an_empty_plan():
    plan = scheduler().schedule()
    assert plan.empty and plan.prefill == [] and plan.decode is False


def test_admission_is_first_come_first_served_up_to_the_batch_size():
    s = scheduler(max_batch_size=4)
    a, b, c, d = Group("a", 4), Group("b", 4, n=2), Group("c", 4, n=2), Group("d", 4)
    s.waiting.extend([a, b, c, d])
    s.schedule()
    # a (1 row) and b (2 rows) fit; c (2 rows) would make 5; d would fit but never overtakes c
    assert s.prefilling == [a, b] and list(s.waiting) == [c, d]
    assert s.kv._reserved == {"a:0": 1, "b:0": 1, "b:1": 1}


def test_running_rows_count_against_the_batch_size():
    s = scheduler(max_batch_size=4)
    s.running = [Seq("r0"), Seq("r1"), Seq("r2")]
    one, two = Group("one", 4), Group("two", 4, n=2)
    s.waiting.extend([two, one])
    s.schedule()
    assert s.prefilling == [] and list(s.waiting) == [two, one]  # two rows do not fit beside three
    s.running.pop()
    s.schedule()
    assert s.prefilling == [two] and list(s.waiting) == [one]


def test_admission_waits_until_the_cache_can_reserve_prompt_plus_max_tokens():
    s = scheduler(kv_blocks=10)
    big, mid, small = Group("big", 60, max_tokens=40), Group("mid", 32, max_tokens=32), Group("small", 8, max_tokens=8)
    s.waiting.extend([big, mid, small])
    s.schedule()
    assert s.prefilling == [big] and s.kv.used_blocks == 7  # 100 tokens: 7 blocks; mid needs 4 more
    assert list(s.waiting) == [mid, small]  # small (1 block) fits but waits behind mid
    s.drop_group(big)  # aborted: its reservation is freed
    assert s.kv.used_blocks == 0
    s.schedule()
    assert s.prefilling == [mid, small] and s.kv.used_blocks == 5 and not s.waiting


def test_a_group_of_n_sequences_is_admitted_whole_or_not_at_all():
    s = scheduler(max_batch_size=8, kv_blocks=10)
    s.kv.allocate("other", 5 * BLOCK)
    three = Group("three", 20, max_tokens=12, n=3)  # 32 tokens: 2 blocks per sequence, 6 in all
    s.waiting.append(three)
    s.schedule()
    assert s.prefilling == [] and s.kv.used_blocks == 5  # 5 free blocks would take two rows, not three
    s.kv.free("other")
    s.schedule()
    assert s.prefilling == [three] and s.kv.used_blocks == 6
    assert sorted(s.kv._reserved) == ["three:0", "three:1", "three:2"]


# ---- Scheduler: chunked prefill and the token budget ---------------------------------------------


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks():
    s = scheduler(max_num_tokens=32)
    s.waiting.append(Group("long", 70))
    steps = []
    while (plan := s.schedule()).prefill:
        steps.append(chunks(plan))
        assert plan.decode is (len(steps) > 3)
        run_prefill(s, plan)
    assert steps == [[("long", 0, 32)], [("long", 32, 64)], [("long", 64, 70)]]
    assert [seq.seq_id for seq in s.running] == ["long:0"]


def test_the_budget_is_shared_first_come_first_served_between_prompts():
    s = scheduler(max_num_tokens=32)
    s.waiting.extend([Group("a", 20), Group("b", 20), Group("c", 5)])
    plan = s.schedule()
    assert chunks(plan) == [("a", 0, 20), ("b", 0, 12)]  # c is admitted but gets no tokens this step
    assert [g.request_id for g in s.prefilling] == ["a", "b", "c"]
    run_prefill(s, plan)
    plan = s.schedule()
    assert chunks(plan) == [("b", 12, 20), ("c", 0, 5)] and plan.decode is True
    assert sum(stop - start for _, start, stop in plan.prefill) == 13  # 32 - 1 running row, only 13 wanted


def test_decode_comes_first_one_token_per_running_row():
    s = scheduler(max_batch_size=4, max_num_tokens=32)
    s.running = [Seq("r0"), Seq("r1"), Seq("r2")]
    s.waiting.append(Group("p", 100))
    plan = s.schedule()
    assert plan.decode is True and chunks(plan) == [("p", 0, 29)]  # 32 - 3 decoded tokens


def test_a_full_batch_still_leaves_prefill_budget():
    s = scheduler(max_batch_size=4, max_num_tokens=5)
    s.running = [Seq("r0"), Seq("r1"), Seq("r2")]
    s.waiting.append(Group("p", 10))
    assert chunks(s.schedule()) == [("p", 0, 2)]


def test_decode_only_step():
    s = scheduler()
    s.running = [Seq("r0")]
    plan = s.schedule()
    assert plan.decode is True and plan.prefill == [] and not plan.empty


# ---- Scheduler: the cache is freed on finish, abort and failure ----------------------------------


def test_a_finished_sequence_frees_only_its_own_reservation():
    s = scheduler(kv_blocks=10)
    group = Group("g", 16, max_tokens=16, n=2)  # 2 blocks per sequence
    s.waiting.append(group)
    run_prefill(s, s.schedule())
    assert s.kv.used_blocks == 4 and [q.seq_id for q in s.running] == ["g:0", "g:1"]
    finished = s.running.pop(0)
    s.release(finished)
    assert s.kv.used_blocks == 2 and list(s.kv._reserved) == ["g:1"]
    s.release(s.running.pop())
    assert s.kv.used_blocks == 0


def test_dropping_a_waiting_or_prefilling_group_frees_it():
    s = scheduler(max_num_tokens=32, kv_blocks=10)
    admitted, queued = Group("admitted", 64, max_tokens=16), Group("queued", 64, max_tokens=16)  # 5 blocks each
    s.waiting.extend([admitted, Group("filler", 60, max_tokens=20), queued])
    plan = s.schedule()
    assert chunks(plan) == [("admitted", 0, 32)] and s.kv.used_blocks == 10
    assert [g.request_id for g in s.prefilling] == ["admitted", "filler"] and list(s.waiting) == [queued]
    run_prefill(s, plan)
    s.drop_group(queued)  # never admitted: nothing to free, no error
    assert not s.waiting and s.kv.used_blocks == 10
    s.drop_group(admitted)  # aborted half-way through its prefill
    assert s.prefilling[0].request_id == "filler" and len(s.prefilling) == 1 and s.kv.used_blocks == 5


def test_a_failed_step_drops_its_groups_and_the_running_batch_without_leaking():
    s = scheduler(max_batch_size=8, max_num_tokens=32)
    first, second = Group("first", 8, max_tokens=8, n=2), Group("second", 40, max_tokens=8)
    s.waiting.append(first)
    run_prefill(s, s.schedule())
    s.waiting.append(second)
    plan = s.schedule()
    assert plan.decode and chunks(plan) == [("second", 0, 30)] and s.kv.used_blocks == 2 + 3
    # what OnnxEngine._fail_groups does: the step's groups and every running request go
    for group in {id(g): g for g in [*(g for g, _, _ in plan.prefill), first]}.values():
        s.drop_group(group)
    s.running = []
    assert s.kv.used_blocks == 0 and not s.prefilling and not s.waiting
    assert s.schedule().empty


# ---- BatchKV ---------------------------------------------------------------------------------------


def cache(values: list[float], offset: float = 0.0) -> np.ndarray:
    """One row of cache ``[1, heads=1, len, dim=1]`` holding ``values`` (+ ``offset``)."""
    return (np.asarray(values, np.float64) + offset).reshape(1, 1, -1, 1)


def rows_of(batch: BatchKV, name: str) -> list[list[float]]:
    return batch.past[name][:, 0, :, 0].tolist()


def new_batch() -> BatchKV:
    return BatchKV(["k", "v"], num_kv_heads=1, head_dim=1, dtype=np.float32)


def test_rows_join_right_aligned_and_left_padded():
    b = new_batch()
    assert (b.size, b.length) == (0, 0)
    b.add_rows({"k": cache([1, 2, 3]), "v": cache([1, 2, 3], 10)}, [3])
    b.add_rows({"k": cache([4, 5, 6, 7, 8]), "v": cache([4, 5, 6, 7, 8], 10)}, [5])
    b.add_rows({"k": cache([9, 9]), "v": cache([9, 9], 10)}, [2])
    assert (b.size, b.length) == (3, 5)
    assert rows_of(b, "k") == [[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 9, 9]]
    assert rows_of(b, "v") == [[0, 0, 11, 12, 13], [14, 15, 16, 17, 18], [0, 0, 0, 19, 19]]
    assert b.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert b.past["k"].dtype == np.float32 and b.past["k"].shape == (3, 1, 5, 1)


def test_a_shared_prefill_row_is_repeated_for_each_sequence():
    b = new_batch()
    b.add_rows({"k": cache([1, 2]), "v": cache([3, 4])}, [2])
    b.add_rows({"k": cache([5, 6, 7]), "v": cache([8, 9, 10])}, [3, 3, 3])
    assert rows_of(b, "k") == [[0, 1, 2], [5, 6, 7], [5, 6, 7], [5, 6, 7]]
    assert rows_of(b, "v") == [[0, 3, 4], [8, 9, 10], [8, 9, 10], [8, 9, 10]]
    assert b.mask.tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]


def test_the_mask_covers_only_the_real_tokens_of_a_padded_source():
    b = new_batch()
    b.add_rows({"k": cache([0, 0, 5, 6]), "v": cache([0, 0, 7, 8])}, [2])
    assert b.mask.tolist() == [[0, 0, 1, 1]] and rows_of(b, "k") == [[0, 0, 5, 6]]


def test_keep_rows_keeps_the_given_order_and_trims_unused_columns():
    b = new_batch()
    b.add_rows({"k": cache([1, 2]), "v": cache([1, 2], 10)}, [2])
    b.add_rows({"k": cache([3, 4, 5, 6, 7]), "v": cache([3, 4, 5, 6, 7], 10)}, [5])
    b.add_rows({"k": cache([8, 9, 10]), "v": cache([8, 9, 10], 10)}, [3])
    assert b.keep_rows([2, 0]) == [2, 0]
    assert rows_of(b, "k") == [[8, 9, 10], [0, 1, 2]]  # the 5-token row left: 2 padding columns go
    assert rows_of(b, "v") == [[18, 19, 20], [0, 11, 12]]
    assert b.mask.tolist() == [[1, 1, 1], [0, 1, 1]] and (b.size, b.length) == (2, 3)
    assert b.past["k"].flags.c_contiguous and b.mask.flags.c_contiguous
    b.keep_rows([1])
    assert rows_of(b, "k") == [[1, 2]] and b.mask.tolist() == [[1, 1]]
    b.keep_rows([])
    assert (b.size, b.length) == (0, 0) and b.past["k"].shape == (0, 1, 0, 1)


def test_a_step_appends_one_column_and_adopts_the_present_arrays():
    b = new_batch()
    b.add_rows({"k": cache([1]), "v": cache([2])}, [1])
    b.add_rows({"k": cache([3, 4]), "v": cache([5, 6])}, [2])
    past, mask = b.step_inputs()
    assert past is b.past and mask.tolist() == [[0, 1, 1], [1, 1, 1]] and b.mask.shape == (2, 2)
    present = {name: np.concatenate([past[name], np.full((2, 1, 1, 1), 7, np.float32)], axis=2) for name in past}
    b.accept_step(present, mask)
    assert rows_of(b, "k") == [[0, 1, 7], [3, 4, 7]] and (b.size, b.length) == (2, 3)
    b.add_rows({"k": cache([9]), "v": cache([9])}, [1])  # joining after steps: padded to the batch length
    assert rows_of(b, "k")[2] == [0, 0, 9] and b.mask.tolist()[2] == [0, 0, 1]
