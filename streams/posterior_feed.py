"""Every worker's view of the latest population posterior of every measure.

The population-posterior topic is compacted and keyed by measure. Each worker
reads *all* its partitions from the beginning with a group-less consumer (every
worker needs every measure's posterior to score its own patients), keeps the
newest version per measure, and calls back when a newer one arrives so the
worker's patients are rescored under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from streams.kafka_options import aiokafka_options
from streams.schemas import POSTERIOR_RECORD, JointPosterior, PopulationPosterior
from streams.scoring import MeasurePosterior
from streams.settings import Settings

log = logging.getLogger(__name__)


class PosteriorBook:
    """Latest MeasurePosterior per measure, and latest JointPosterior per joint
    group (``joint``); ``offer`` keeps only newer versions."""

    def __init__(self) -> None:
        self._latest: dict[str, MeasurePosterior] = {}
        self.messages: dict[str, PopulationPosterior] = {}
        self.joint: dict[str, JointPosterior] = {}
        # True once the feed has read the topic up to its end as of the start:
        # before that, a population owner would not know the latest version.
        self.caught_up = False

    def __contains__(self, measure: str) -> bool:
        return measure in self._latest

    def __getitem__(self, measure: str) -> MeasurePosterior:
        return self._latest[measure]

    def version(self, measure: str) -> int:
        current = self._latest.get(measure)
        return current.version if current else 0

    def joint_version(self, group: str) -> int:
        current = self.joint.get(group)
        return current.version if current else 0

    def offer(self, message: PopulationPosterior | JointPosterior) -> bool:
        """Take ``message`` if it is newer than what is held; True if taken."""
        if isinstance(message, JointPosterior):
            if message.version <= self.joint_version(message.group):
                return False
            self.joint[message.group] = message
            return True
        if message.version <= self.version(message.measure):
            return False
        self._latest[message.measure] = MeasurePosterior.from_message(message)
        self.messages[message.measure] = message
        return True


async def follow_posteriors(
    settings: Settings,
    book: PosteriorBook,
    on_new: Callable[[PopulationPosterior | JointPosterior], Awaitable[None]],
    stopping: asyncio.Event | None = None,
) -> None:
    """Read the posterior topic forever (until ``stopping``), offering every
    message to ``book`` and awaiting ``on_new`` for each newer version.

    While catching up with what was published before the start, ``on_new`` is
    awaited once per measure, for its newest version, when the end is reached
    (with ``rescore`` set if any version read on the way asked for it): a worker
    starting on a topic that holds v1..vN rescores its patients once, under vN,
    not N times, and never publishes scores under a superseded posterior."""
    topic = settings.topic("population-posterior")
    consumer = AIOKafkaConsumer(
        **aiokafka_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        # partitions_for_topic reads the cached metadata: refresh it quickly so a
        # topic created moments ago is found (the default age is 5 minutes).
        metadata_max_age_ms=1000,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = None
        while partitions is None and not (stopping and stopping.is_set()):
            found = consumer.partitions_for_topic(topic)
            partitions = sorted(found) if found else None
            if partitions is None:
                await asyncio.sleep(0.5)
        if partitions is None:
            return
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning()
        end = await consumer.end_offsets(assigned)
        # Newest per measure or joint group (by record key), while catching up.
        pending: dict[bytes | None, PopulationPosterior | JointPosterior] = {}
        while not (stopping and stopping.is_set()):
            if not book.caught_up:
                positions = [await consumer.position(tp) for tp in assigned]
                book.caught_up = all(
                    p >= end[tp] for p, tp in zip(positions, assigned, strict=True)
                )
                if book.caught_up:
                    for message in pending.values():
                        await on_new(message)
                    pending.clear()
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        message = POSTERIOR_RECORD.validate_json(record.value)
                    except ValidationError as error:
                        log.warning("ignoring an invalid population posterior: %s", error)
                        continue
                    if not book.offer(message):
                        continue
                    if book.caught_up:
                        await on_new(message)
                        continue
                    earlier = pending.get(record.key)
                    if (
                        isinstance(earlier, PopulationPosterior)
                        and earlier.rescore
                        and not message.rescore
                    ):
                        message = message.model_copy(update={"rescore": True})
                    pending[record.key] = message
    finally:
        await consumer.stop()
