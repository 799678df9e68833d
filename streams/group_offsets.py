"""The consumer group's progress on the raw topics, read from Kafka.

``GroupOffsets.read()`` returns each raw partition's log end offset and the
group's committed offset (a partition without a commit counts from its log
start offset, where the group would begin). An admin client asks the group
coordinator for the commits (OffsetFetch) and a consumer outside any group asks
the partition leaders for the ends (ListOffsets): neither joins the group nor
touches the worker's own consumer. ``watch`` polls them into a
``streams.group_backlog.GroupBacklog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.group_backlog import GroupBacklog
from streams.kafka_options import aiokafka_options, start_client
from streams.settings import Settings
from streams.telemetry import Telemetry

log = logging.getLogger(__name__)


async def all_partitions(consumer: AIOKafkaConsumer, topics: list[str], timeout: float = 30.0):
    """Every partition of ``topics`` (TopicPartitions), waiting for the consumer's
    metadata to list them (``partitions_for_topic`` reads cached metadata,
    refreshed in the background every ``metadata_max_age_ms``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {t: consumer.partitions_for_topic(t) for t in topics}
        if all(found.values()):
            return [TopicPartition(t, p) for t in topics for p in sorted(found[t])]
        if time.monotonic() > deadline:
            missing = [t for t, ps in found.items() if not ps]
            raise TimeoutError(f"no partitions found for {missing}")
        await consumer.topics()
        await asyncio.sleep(0.5)


class GroupOffsets:
    """Reads ``group_id``'s committed offsets and the end offsets of every
    partition of ``topics``; the clients start, and the partitions are looked
    up, on the first read (``target``: Settings, or a plaintext bootstrap
    address as streams.kafka_options.aiokafka_options takes)."""

    def __init__(self, target: Settings | str, group_id: str, topics: Iterable[str]) -> None:
        self.target = target
        self.group_id = group_id
        self.topics = sorted(topics)
        self.partitions: list[TopicPartition] = []
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def _start(self) -> None:
        options = aiokafka_options(self.target)
        admin = AIOKafkaAdminClient(**options)
        await start_client(admin, self.target)
        self._admin = admin
        consumer = AIOKafkaConsumer(
            **options, group_id=None, enable_auto_commit=False, metadata_max_age_ms=5000
        )
        await start_client(consumer, self.target)
        self._consumer = consumer
        self.partitions = await all_partitions(consumer, self.topics)

    async def read(self) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """``(ends, committed)`` per raw partition."""
        if self._admin is None or self._consumer is None:
            await self.close()
            await self._start()
        assert self._admin is not None and self._consumer is not None
        ends = await self._consumer.end_offsets(self.partitions)
        starts = await self._consumer.beginning_offsets(self.partitions)
        commits = await self._admin.list_consumer_group_offsets(
            self.group_id, partitions=self.partitions
        )
        committed = {}
        for tp in self.partitions:
            commit = commits.get(tp)
            offset = commit.offset if commit is not None else -1
            committed[tp] = max(offset, starts[tp])
        return dict(ends), committed

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        with contextlib.suppress(Exception):  # closing after a failure may fail again
            if consumer is not None:
                await consumer.stop()
        with contextlib.suppress(Exception):
            if admin is not None:
                await admin.close()


def watch(
    app: faust.App,
    offsets: GroupOffsets,
    backlog: GroupBacklog,
    telemetry: Telemetry,
    interval: float,
) -> None:
    """Every ``interval`` seconds read the group's offsets into ``backlog`` and
    the ``efficacy_group_lag_records`` gauge. A failed read leaves the backlog's
    samples to go stale (then *unknown*, fits unpaced) and is retried."""
    failures = 0

    async def poll() -> None:
        nonlocal failures
        try:
            ends, committed = await offsets.read()
        except Exception as error:  # a broker away: the worker goes on without the signal
            failures += 1
            level = logging.WARNING if failures == 3 else logging.DEBUG
            log.log(level, "could not read the consumer group's offsets: %r", error)
            await offsets.close()
            return
        failures = 0
        backlog.observe(time.monotonic(), ends, committed)
        telemetry.group_lag(backlog.lag())

    async def poll_until_stopped() -> None:
        try:
            while True:
                await poll()
                await asyncio.sleep(interval)
        finally:
            await offsets.close()

    app.task(poll_until_stopped)
