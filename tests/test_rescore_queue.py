"""When rescoring after a new posterior runs (streams.rescore_queue): pure
bookkeeping, no broker. The end-to-end contract (every latest score under the
last posterior once a run settles) is tests/test_pipeline_e2e.py's."""

from __future__ import annotations

from streams.rescore_queue import ChunkBudget, RawBacklog, RescoreQueue


def test_versions_before_the_pass_merge_into_one_request_and_keep_its_age() -> None:
    queue = RescoreQueue(max_delay=30.0)
    queue.request("phq9", joint=False, force=False, now=10.0)
    queue.request("phq9", joint=False, force=True, now=11.0)
    queue.request("phq9", joint=False, force=False, now=12.0)
    assert len(queue) == 1
    request = queue.take_due(now=12.0, backlogged=False)
    assert request is not None
    assert (request.key, request.joint, request.force, request.since) == ("phq9", False, True, 10.0)
    assert queue.take_due(now=12.0, backlogged=False) is None


def test_a_measure_and_a_joint_group_of_the_same_name_are_separate_requests() -> None:
    queue = RescoreQueue(max_delay=30.0)
    queue.request("vitals", joint=True, force=False, now=1.0)
    queue.request("vitals", joint=False, force=False, now=2.0)
    first, second = (queue.take_due(now=3.0, backlogged=False) for _ in range(2))
    assert (first.joint, second.joint) == (True, False)  # oldest first
    assert first.name == "joint vitals" and second.name == "vitals"


def test_a_backlog_defers_a_request_until_its_deadline_only() -> None:
    queue = RescoreQueue(max_delay=30.0)
    queue.request("hr", joint=False, force=False, now=100.0)
    assert queue.take_due(now=100.0, backlogged=True) is None
    assert queue.take_due(now=129.9, backlogged=True) is None
    assert queue.take_due(now=130.0, backlogged=True) is not None  # waited max_delay
    queue.request("hr", joint=False, force=False, now=200.0)
    assert queue.take_due(now=200.0, backlogged=False) is not None  # no backlog: at once


def test_under_a_backlog_passes_take_at_most_their_share_of_the_time() -> None:
    queue = RescoreQueue(max_delay=30.0, share=0.2)
    queue.request("hr", joint=False, force=False, now=0.0)
    request = queue.take_due(now=30.0, backlogged=True)
    queue.done(request, seconds=50.0)  # a long pass: 100k patients
    queue.request("hr", joint=False, force=False, now=80.0)
    pending = queue.take_due(now=80.0 + 199.0, backlogged=True)
    assert pending is None  # 50 s of pass at share 0.2: 200 s of stream between passes
    assert queue.take_due(now=80.0 + 200.0, backlogged=True) is not None
    # another key is paced by its own passes
    queue.request("phq9", joint=False, force=False, now=300.0)
    assert queue.take_due(now=330.0, backlogged=True) is not None


def test_zero_max_delay_never_defers() -> None:
    queue = RescoreQueue(max_delay=0.0)
    queue.request("hr", joint=False, force=False, now=5.0)
    assert queue.take_due(now=5.0, backlogged=True) is not None


def test_the_backlog_sums_fresh_partitions_and_forgets_stale_ones() -> None:
    backlog = RawBacklog(threshold=1000, stale_after=5.0)
    backlog.observe(("wearables", 0), next_offset=500, end_offset=1200, now=0.0)
    backlog.observe(("labs", 0), next_offset=10, end_offset=410, now=1.0)
    assert backlog.records(now=1.0) == 700 + 400
    assert backlog.backlogged(now=1.0)
    assert backlog.records(now=5.5) == 400  # wearables/0 not seen for 5.5 s
    assert not backlog.backlogged(now=5.5)
    backlog.observe(("labs", 0), next_offset=410, end_offset=410, now=6.0)  # caught up
    assert backlog.records(now=6.0) == 0


def test_an_unknown_end_offset_counts_as_nothing_waiting() -> None:
    backlog = RawBacklog(threshold=0)
    backlog.observe(("wearables", 1), next_offset=42, end_offset=None, now=0.0)
    assert backlog.records(now=0.0) == 0 and not backlog.backlogged(now=0.0)
    backlog.observe(("wearables", 1), next_offset=42, end_offset=40, now=0.0)  # stale highwater
    assert backlog.records(now=0.0) == 0


def test_records_taken_but_not_yet_applied_count_as_waiting() -> None:
    # In a backfill one take holds every chunk faust has buffered: Kafka's end
    # offsets are reached while thousands of records wait in the agent's hands.
    backlog = RawBacklog(threshold=1000)
    backlog.observe(("wearables", 0), next_offset=9000, end_offset=9000, now=0.0)
    backlog.in_hand = 8000
    assert backlog.records(now=0.0) == 8000 and backlog.backlogged(now=0.0)
    backlog.in_hand = 0
    assert not backlog.backlogged(now=0.0)


def test_chunks_settle_at_the_loop_budget_for_a_steady_cost_per_patient() -> None:
    budget = ChunkBudget(target_seconds=0.1, first=64)
    per_patient = 0.4e-3  # a rescoring chunk's measured cost at 100k patients
    sizes = []
    for _ in range(12):
        sizes.append(budget.size)
        budget.record(budget.size, budget.size * per_patient)
    assert sizes[:3] == [64, 128, 250]  # growth at most doubles a chunk
    assert budget.size == 250  # 0.1 s / 0.4 ms
    assert all(size * per_patient <= 0.1 + 1e-9 for size in sizes)


def test_a_slow_chunk_shrinks_the_next_one_at_once() -> None:
    budget = ChunkBudget(target_seconds=0.1, first=1000)
    budget.record(1000, 2.0)  # the fit's thread held the GIL
    assert budget.size == 50
    budget.record(50, 60.0)
    assert budget.size == budget.smallest
    budget.record(0, 0.0)  # an empty chunk says nothing
    assert budget.size == budget.smallest


def test_chunks_stay_within_their_bounds() -> None:
    budget = ChunkBudget(target_seconds=0.1, first=4096, largest=4096)
    budget.record(4096, 1e-9)
    assert budget.size == 4096
