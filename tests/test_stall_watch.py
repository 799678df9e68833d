"""streams.stall_watch's decision: a partition is stalled when records wait
beyond the worker's read position and that position has not moved."""

from __future__ import annotations

from faust.types import TP

from streams.stall_watch import STALL_CHECKS, stalled

A, B, C = TP("t", 0), TP("t", 1), TP("t", 2)


def test_counts_checks_without_progress_only_while_records_wait():
    ends = {A: 100, B: 50, C: 10}
    first = stalled({A: 40, B: 49, C: None}, ends, {})
    # B has read its last record (offset 49 of end 50); C has read nothing since
    # it was assigned, so where it starts is unknown: neither counts.
    assert first == {A: (40, 1)}
    second = stalled({A: 40, B: 49, C: None}, ends, first)
    assert second == {A: (40, 2)}
    # progress resets the count; a later stall counts again from one
    moved = stalled({A: 41, B: 49, C: None}, ends, second)
    assert moved == {A: (41, 1)}


def test_a_partition_is_reported_after_stall_checks_in_a_row():
    ends = {A: 100}
    state: dict = {}
    for _ in range(STALL_CHECKS):
        state = stalled({A: 40}, ends, state)
    assert state[A] == (40, STALL_CHECKS)
    # records caught up: nothing waits, nothing to report
    assert stalled({A: 99}, ends, state) == {}
