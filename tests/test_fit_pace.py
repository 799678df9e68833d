"""Population fits paced under a backlog (streams.fit_pace): the bookkeeping,
and the population agent skipping a fit that is not due (no broker: the
service's app never connects)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_population_ownership import FAST_SVI, population_service
from test_selection import STREAM_MEASURE, FakeTopic, _evidence

from streams.fit_pace import FitPace
from streams.schemas import EvidenceBatch


def test_without_a_backlog_or_a_previous_fit_a_fit_is_due_at_once() -> None:
    pace = FitPace(share=0.2)
    assert pace.due("hr", now=0.0, backlogged=True)  # no fit yet on this worker
    pace.done("hr", started=0.0, ended=5.0)
    assert pace.due("hr", now=5.0, backlogged=False)


def test_under_a_backlog_fits_take_at_most_their_share_of_the_time() -> None:
    pace = FitPace(share=0.2)
    pace.done("hr", started=10.0, ended=14.0)  # a 4 s fit: 16 s of stream before the next
    assert not pace.due("hr", now=29.9, backlogged=True)
    assert pace.due("hr", now=30.0, backlogged=True)
    assert pace.due("phq9", now=15.0, backlogged=True)  # each key by its own fits


def test_the_wait_is_capped_and_a_moved_key_starts_over() -> None:
    pace = FitPace(share=0.2, max_wait=60.0)
    pace.done("joint:vitals", started=0.0, ended=40.0)  # a fit slowed by a compilation
    assert pace.next_due("joint:vitals") == 100.0  # not 40 + 160
    pace.forget("joint:vitals")
    assert pace.due("joint:vitals", now=41.0, backlogged=True)


def test_a_share_of_one_never_waits_and_a_share_out_of_range_is_refused() -> None:
    pace = FitPace(share=1.0)
    pace.done("hr", started=0.0, ended=10.0)
    assert pace.due("hr", now=10.0, backlogged=True)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="share"):
            FitPace(share=share)


def test_the_population_agent_skips_a_fit_that_is_not_due_under_a_backlog() -> None:
    topic = FakeTopic()
    service = population_service("fit-pace-test", topic=topic, svi=FAST_SVI)
    service.owns = lambda measure: True  # type: ignore[method-assign]
    service._owned.add(STREAM_MEASURE)  # its book is this worker's already
    backlog = {"now": True}
    service.backlogged = lambda: backlog["now"]
    evidence = _evidence(7, num_patients=30, num_cohorts=2, obs_per_patient=6)

    def tick_with(items) -> int:
        service.take(EvidenceBatch(measure=STREAM_MEASURE, items=items))
        asyncio.run(service._tick_measure(STREAM_MEASURE))
        return len(topic.sent)

    assert tick_with(evidence[:10]) == 1  # the first fit on this worker: at once
    assert tick_with(evidence[10:20]) == 1  # under the backlog, right after it: waits
    assert service.books[STREAM_MEASURE].changes_since_fit == 10  # kept for the next fit
    backlog["now"] = False
    assert tick_with(evidence[20:25]) == 2  # the backlog cleared: fitted
    backlog["now"] = True
    service.pace.max_wait = 0.0
    assert tick_with(evidence[25:]) == 3  # due again (no wait allowed)


def test_another_workers_backlog_paces_the_owners_fits() -> None:
    # the owner has caught up, but a partition of the group still holds records
    # older than the horizon (streams.group_backlog): its fits stay paced
    topic = FakeTopic()
    service = population_service("fit-pace-group", topic=topic, svi=FAST_SVI)
    service.owns = lambda measure: True  # type: ignore[method-assign]
    service._owned.add(STREAM_MEASURE)
    service.backlogged = lambda: False
    evidence = _evidence(8, num_patients=30, num_cohorts=2, obs_per_patient=6)

    def tick_with(items) -> int:
        service.take(EvidenceBatch(measure=STREAM_MEASURE, items=items))
        asyncio.run(service._tick_measure(STREAM_MEASURE))
        return len(topic.sent)

    assert tick_with(evidence[:10]) == 1
    now, horizon = time.monotonic(), service.group.horizon
    service.group.observe(now - horizon, {"raw-1": 900}, {"raw-1": 0})
    service.group.observe(now, {"raw-1": 1000}, {"raw-1": 400})  # a peer replaying
    assert tick_with(evidence[10:20]) == 1  # paced: waits
    service.group.observe(time.monotonic(), {"raw-1": 1000}, {"raw-1": 1000})  # caught up
    assert tick_with(evidence[20:]) == 2
