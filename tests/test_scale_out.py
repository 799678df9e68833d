"""Scaling out mid-stream (issue 19, item 6): two workers consume a programme
published at a bounded rate; a third joins while records flow. The group
rebalances without a crash: partitions (and the patients' table state, through
its changelog) move to the newcomer while the others keep processing.

Afterwards nothing is lost or counted twice: every patient's statistics (the
latest changelog record per patient) equal the batch computation over the
unique valid events, and the run settles as tests/settling.py defines it (every
patient's latest score counts all its readings and was computed under the last
posterior, up to the worker's materiality thresholds).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from e2e_setup import SYNCED, start_in_turn
from faust.transport.consumer import Consumer
from test_reliability import (
    MEASURE,
    Publisher,
    Run,
    patient_states,
    statistics_mismatch,
    wait_settled,
)

from cli.programme import build_programme
from cli.worker_process import READY, WorkerProcess
from streams import consumer_seek
from streams.agents.patients import current_records

pytestmark = pytest.mark.kafka
# Six partitions, not the four of the other tests: faust's sticky assignor caps
# each worker at ceil(partitions / workers) and moves nothing else, so with four
# partitions the two workers' 2 + 2 already fit the cap of three workers (2)
# and a newcomer gets nothing; with six, each gives up one (3 + 3 -> 2 + 2 + 2).
PARTITIONS = "6"


def test_a_third_worker_joining_mid_stream_loses_nothing_and_counts_nothing_twice(
    kafka_bootstrap, tmp_path
):
    programme = build_programme(
        [MEASURE], num_patients=120, num_cohorts=4, obs_per_patient=30, design="crossover",
        seed=41, bad_fraction=0.02, duplicate_fraction=0.02,
    )  # fmt: skip
    run = Run(kafka_bootstrap, "scaleout", programme)
    # The workers create the topics (READY before the first record), so the
    # publisher's partitioner finds six partitions.
    workers = [
        WorkerProcess(run.env(tmp_path / name, EFFICACY_PARTITIONS=PARTITIONS)) for name in "abc"
    ]
    first, second, third = workers
    try:
        start_in_turn(first, second)  # both hold partitions before the first record
        # ~4200 records at 80/s: the stream lasts ~50 s. The third worker starts
        # a tenth of the way in; its start (imports, group join) takes 15-40 s
        # on two loaded cores, so it joins the group while records flow.
        publisher = Publisher(run.programme, run.settings, rate=80)
        publisher.start()
        publisher.wait_for(0.1)
        third.start()
        third.wait_for_log(SYNCED, timeout=180)
        joined_at = publisher.sent
        third.wait_for_log(READY, timeout=180)
        publisher.finish()
        assert joined_at < publisher.total, "the third worker joined after the stream ended"
        wait_settled(run, timeout=420)  # tests/settling.py: under the last posterior
        for worker in workers:
            assert worker.alive(), worker.log_tail()
        # The newcomer took over raw partitions (with their patients' state).
        owned = {
            name: w.assigned(run.prefix + "wearables")
            for name, w in zip("abc", workers, strict=True)
        }
        print(f"third worker joined after {joined_at}/{publisher.total} records; "
              f"wearables partitions now {owned}")  # fmt: skip
        assert owned["c"] not in ("", "{}"), third.log_tail()
        # Nothing lost or counted twice (polled: the last table writes may still
        # be in a worker's producer buffer).
        deadline = time.monotonic() + 60
        while (problem := statistics_mismatch(run, patient_states(run))) is not None:
            assert time.monotonic() < deadline, problem
            time.sleep(2.0)
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0, 0], [w.log_tail() for w in workers]


def test_a_message_of_an_earlier_consumer_generation_is_not_acknowledged():
    """streams.consumer_seek's Consumer.ack: faust's stream acks the records it
    skips as fetched before a rebalance; acked, the offset commit passes them
    and they are never processed (what the test above saw). Not acked, they are
    fetched again from the committed offset."""
    consumer_seek.install()
    topics = SimpleNamespace(acks_enabled_for=lambda topic: False)
    consumer = SimpleNamespace(app=SimpleNamespace(consumer_generation_id=3, topics=topics))
    stale = SimpleNamespace(generation_id=2, acked=False, topic="t", tp=None, offset=7)
    current = SimpleNamespace(generation_id=3, acked=False, topic="t", tp=None, offset=8)
    assert Consumer.ack(consumer, stale) is False and not stale.acked
    Consumer.ack(consumer, current)
    assert current.acked  # faust's own ack ran


def test_records_fetched_before_a_rebalance_are_not_applied_after_it():
    """streams.agents.patients.current_records: a batch taken before a rebalance
    and processed after it keeps only the records of the current generation."""
    fetched = [SimpleNamespace(generation_id=g) for g in (3, 4, 3, 4)]
    pending = list(zip(fetched, "abcd", strict=True))
    app = SimpleNamespace(consumer_generation_id=4)
    assert current_records(app, pending) == (["b", "d"], 2)
    app.consumer_generation_id = 5
    assert current_records(app, pending) == ([], 4)
    assert current_records(app, []) == ([], 0)
