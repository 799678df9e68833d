"""Records out, straight through the worker's Kafka producer, deliveries checked.

faust sends each record through its own buffer (a FutureMessage, a
PendingMessage and a task hand-off per record: ~100 µs, and a stall whenever
more than 100 wait, faust-streaming #173), and a failed delivery of a table's
changelog is only logged. ``Producer`` hands records to the aiokafka producer
the faust app already runs (its connection and client options: streams.app),
and returns each record's delivery future; ``delivered`` waits for all of them
and raises on the first failure, so the caller can stop before the events that
caused the records are acknowledged (and their offsets committed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import NoReturn

import faust

log = logging.getLogger(__name__)

EXIT_DELIVERY_FAILED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


class DeliveryFailed(RuntimeError):
    """A record the worker produced was not written to Kafka."""


class Producer:
    """Sends raw (bytes) records through the faust app's aiokafka producer.

    The producer is faust-streaming 0.15.3's ``Producer._producer`` (the version
    pyproject pins; tests/test_chunked_consumer.py checks the pin)."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> asyncio.Future:
        """Queue one record; returns its delivery future (RecordMetadata). The
        partition defaults to the producer's partitioner on the key (Kafka's
        murmur2, as faust's own sends)."""
        producer = self.app.producer._ensure_producer()
        return await producer.send(topic, value=value, key=key, partition=partition)


async def delivered(futures: Iterable[asyncio.Future]) -> None:
    """Wait until every record is written; DeliveryFailed on the first failure."""
    futures = list(futures)
    if not futures:
        return
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise DeliveryFailed(
            f"{len(errors)} of {len(futures)} records not delivered: {errors[0]!r}"
        ) from errors[0]


def stop_now(error: DeliveryFailed) -> NoReturn:
    """Exit at once, without the clean shutdown's offset commit: records the
    worker produced were lost, and the events that caused them must be read
    again by the next worker. (A delivery that waits on an unreachable broker
    does not fail: the worker waits with it, and commits nothing past it.)"""
    log.critical("stopping the worker: %s", error)
    logging.shutdown()  # flush the log before the hard exit
    os._exit(EXIT_DELIVERY_FAILED)
