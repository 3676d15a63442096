"""The batch policy, without a model: admission, token budget, chunking, join and leave."""

from __future__ import annotations

import time

import pytest

from server.scheduler.scheduler import QueueFullError, Scheduler, SchedulerConfig, Sequence


def seq(name: str, n: int, **kw) -> Sequence:
    return Sequence(name, list(range(n)), **kw)


def plan_of(s: Scheduler, can_admit=lambda q: True):
    plan = s.schedule(can_admit)
    s.advance(plan)
    return [(e.seq.request_id, e.start, e.n) for e in plan.entries], plan


def generate(s: Scheduler, plan, token: int = 7) -> None:
    """What the engine does after a step: sampled sequences get one more token."""
    for e in plan.entries:
        if e.samples:
            e.seq.output_ids.append(token)


def test_join_next_step_and_decode_first():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_tokens_per_step=8, kv_rows=4))
    a = seq("a", 3)
    s.submit(a)
    entries, plan = plan_of(s)
    assert entries == [("a", 0, 3)]
    generate(s, plan)
    b = seq("b", 20)
    s.submit(b)
    entries, plan = plan_of(s)
    # a decodes one token; b joins in the same step with a chunk of the remaining budget.
    assert entries == [("a", 3, 1), ("b", 0, 7)]
    generate(s, plan)
    entries, plan = plan_of(s)
    assert entries == [("a", 4, 1), ("b", 7, 7)]
    generate(s, plan)
    entries, plan = plan_of(s)
    assert entries == [("a", 5, 1), ("b", 14, 6)]  # b's last chunk samples
    assert plan.entries[1].samples
    generate(s, plan)
    entries, _ = plan_of(s)
    assert entries == [("a", 6, 1), ("b", 20, 1)]


def test_leave_frees_row_for_waiting_request():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_tokens_per_step=64, kv_rows=2))
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for x in (a, b, c):
        s.submit(x)
    entries, plan = plan_of(s)
    assert [e[0] for e in entries] == ["a", "b"]
    assert (a.row, b.row) == (0, 1)
    assert list(s.waiting) == [c]
    generate(s, plan)
    s.finish(a)
    entries, _ = plan_of(s)
    assert entries == [("b", 2, 1), ("c", 0, 2)]
    assert c.row == 0  # the lowest free row is reused


def test_admission_skips_requests_that_cannot_get_an_adapter_slot():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_tokens_per_step=64, kv_rows=4))
    blocked, free = seq("blocked", 3), seq("free", 3)
    s.submit(blocked)
    s.submit(free)
    entries, _ = plan_of(s, can_admit=lambda q: q.request_id != "blocked")
    assert entries == [("free", 0, 3)]
    assert list(s.waiting) == [blocked]
    entries, _ = plan_of(s)
    assert ("blocked", 0, 3) in entries


def test_budget_limits_admission_and_batch_size_limits_rows():
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_tokens_per_step=10, kv_rows=8))
    for i in range(5):
        s.submit(seq(f"r{i}", 4))
    entries, _ = plan_of(s)
    assert entries == [("r0", 0, 4), ("r1", 0, 4), ("r2", 0, 2)]
    assert len(s.running) == 3 and len(s.waiting) == 2


def test_bounded_queue_reports_both_numbers():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_tokens_per_step=8, max_queue=2,
                                  kv_rows=1))
    s.submit(seq("a", 1))
    s.submit(seq("b", 1))
    with pytest.raises(QueueFullError, match="2 requests waiting, limit 2"):
        s.submit(seq("c", 1))


def test_dead_requests_do_not_hold_a_full_queue():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_tokens_per_step=8, max_queue=2,
                                  kv_rows=1))
    late = seq("late", 1, deadline=time.monotonic() - 1)
    gone = seq("gone", 1)
    s.submit(late)
    s.submit(gone)
    gone.cancelled = True
    s.submit(live := seq("live", 1))  # both dead ones make room at once
    entries, plan = plan_of(s)
    assert [e[0] for e in entries] == ["live"]
    assert plan.dropped == [late, gone]  # the engine still answers them
    s.submit(seq("x", 1))
    s.submit(seq("y", 1))
    with pytest.raises(QueueFullError):
        s.submit(seq("z", 1))
    assert live.row is not None


def test_cancelled_and_expired_leave_within_one_step():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_tokens_per_step=16, kv_rows=4))
    a, b = seq("a", 2), seq("b", 2, deadline=time.monotonic() + 3600)
    late = seq("late", 2, deadline=time.monotonic() - 1)
    for x in (a, b, late):
        s.submit(x)
    entries, plan = plan_of(s)
    assert [e[0] for e in entries] == ["a", "b"]
    assert plan.dropped == [late]
    a.cancelled = True
    entries, plan = plan_of(s)
    assert plan.dropped == [a] and a.row is None
    assert [e[0] for e in entries] == ["b"]


def test_budget_must_fit_a_full_decode_batch():
    with pytest.raises(ValueError, match="max_tokens_per_step 4 is less than max_batch_size 8"):
        SchedulerConfig(max_batch_size=8, max_tokens_per_step=4)
