"""A watchdog for stream partitions that faust stops fetching.

Faust fetches only the partitions in its consumer's *active* set. It removes a
partition from that set while the agent's buffer is under pressure
(``Consumer.on_buffer_full``) and during a rebalance, and adds it back when the
buffer drains or recovery ends. A SIGKILL test (tests/test_reliability.py)
once ended with two partitions of the survivor never fetched again, its
worker idle for ten minutes: that one was records aiokafka handed over for a
paused partition and faust skipped, the fetch position past them
(streams.chunked_consumer fetches such records again). The log line gives the
fetch position: at the partition's end while the read offset is behind means
records were fetched and not delivered, which resuming cannot repair.

``StallWatch`` checks every ``interval`` seconds each assigned raw-topic
partition: one that has records beyond the worker's read position, and whose
read position has not moved for STALL_CHECKS checks in a row, is *stalled*. It is logged
with faust's view of it (active, paused, buffered) and put back into the active
set. A partition that is merely slow moves between checks; a paused one during
recovery is not assigned to the stream yet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import faust
from faust.types import TP

log = logging.getLogger(__name__)

STALL_CHECKS = 3  # checks in a row that see records waiting and no progress


def stalled(
    read: Mapping[TP, int | None],
    ends: Mapping[TP, int],
    previous: Mapping[TP, tuple[int, int]],
) -> dict[TP, tuple[int, int]]:
    """(read offset, checks without progress) of every partition with records
    waiting beyond the worker's read position. ``read``: the offset of the last
    record the worker took from each partition (None: none since it was
    assigned, then the partition is left out: its start is unknown here);
    ``ends``: the end offsets; ``previous``: the result of the last check."""
    result: dict[TP, tuple[int, int]] = {}
    for tp, end in ends.items():
        position = read.get(tp)
        if position is None or end <= position + 1:
            continue
        before, count = previous.get(tp, (None, 0))
        result[tp] = (position, count + 1 if before == position else 1)
    return result


class StallWatch:
    """Resume partitions of ``topics`` that faust stopped fetching (see module)."""

    def __init__(self, app: faust.App, topics: Iterable[str]) -> None:
        self.app = app
        self.topics = set(topics)
        self._previous: dict[TP, tuple[int, int]] = {}

    async def check(self) -> list[TP]:
        """One check; returns the partitions resumed."""
        consumer = self.app.consumer
        if self.app.rebalancing or self.app.tables.recovery.in_recovery:
            self._previous.clear()
            return []
        assigned = [tp for tp in consumer.assignment() if tp.topic in self.topics]
        if not assigned:
            return []
        ends = await consumer.highwaters(*assigned)
        read = {tp: consumer._read_offset[tp] for tp in assigned}
        self._previous = stalled(read, ends, self._previous)
        resumed = []
        for tp, (position, count) in self._previous.items():
            if count < STALL_CHECKS:
                continue
            active = consumer._get_active_partitions()
            log.warning(
                "partition %s:%d not fetched for %d checks (read %d, end %d, fetch position "
                "%s; active %s, paused %s, buffered %s): resuming it",
                tp.topic, tp.partition, count, position, ends[tp], await consumer.position(tp),
                tp in active,
                tp in consumer._paused_partitions, tp in consumer._buffered_partitions,
            )  # fmt: skip
            consumer._buffered_partitions.discard(tp)
            consumer.resume_partitions({tp})
            resumed.append(tp)
        for tp in resumed:
            del self._previous[tp]
        return resumed


def install(app: faust.App, topics: Iterable[str], interval: float) -> StallWatch:
    """Run a StallWatch over ``topics`` every ``interval`` seconds."""
    watch = StallWatch(app, topics)
    app.timer(interval, name="stall-watch")(watch.check)
    return watch
