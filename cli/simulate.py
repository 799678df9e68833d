"""``efficacy simulate``: publish a simulated programme to the source topics.

Builds the programme with ``cli.programme.build_programme``, writes the
ground truth to ``--truth``, then publishes every enrolment and exposure event
(and waits for their acks) before the readings, so a reading never overtakes
the enrolment that governs it. One aiokafka producer, ``acks=all``, batched:
tens of thousands of events per second on one core; ``--rate`` caps the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from cli.programme import DEFAULT_START, Programme, Record, build_programme
from streams.catalogue import Catalogue, CatalogueError, UnknownMeasure
from streams.settings import Settings

DESIGNS = {"baseline": "baseline_then_exposure", "crossover": "crossover"}
CHUNK = 2000  # records sent before the rate limiter and progress check run


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--patients", type=int, default=200, help="number of patients (default 200)")
    add("--cohorts", type=int, default=10, help="number of cohorts / clinics (default 10)")
    add("--obs-per-patient", type=int, default=30, help="readings per patient and measure")
    add(
        "--measures",
        default="resting_heart_rate",
        help="comma-separated catalogue measures (default resting_heart_rate)",
    )
    add("--design", choices=sorted(DESIGNS), default="baseline", help="exposure schedule")
    add("--time-span", type=float, default=90.0, help="days each patient is followed")
    add("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    add("--bad-fraction", type=float, default=0.01, help="extra bad records, fraction of readings")
    add("--duplicate-fraction", type=float, default=0.01, help="re-sent readings, fraction")
    add("--alternative-unit-fraction", type=float, default=0.1, help="readings in another unit")
    add("--seed", type=int, default=0)
    add("--start", default=DEFAULT_START.isoformat(), help="programme start (ISO 8601, with zone)")
    add("--truth", type=Path, default=Path("simulation-truth.json"), help="ground-truth JSON")
    add(
        "--catalogue",
        type=Path,
        default=os.environ.get("EFFICACY_MEASURES_FILE") or None,
        help="measure catalogue TOML (default $EFFICACY_MEASURES_FILE or the shipped one)",
    )
    add("--dry-run", action="store_true", help="write the truth file, publish nothing")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every record was acknowledged; 2 for bad arguments."""
    try:
        programme = _build(args)
    except (CatalogueError, UnknownMeasure, ValueError) as error:
        print(f"efficacy simulate: {_message(error)}", file=sys.stderr)
        return 2
    truth = programme.truth
    args.truth.parent.mkdir(parents=True, exist_ok=True)
    args.truth.write_text(truth.to_json())
    print(
        f"programme: {len(truth.patients)} patients, {len(truth.measures)} measure(s), "
        f"{truth.valid_unique_readings} valid readings, {len(truth.bad_records)} bad, "
        f"{len(truth.duplicates)} duplicates; truth written to {args.truth}",
        flush=True,
    )
    if args.dry_run:
        return 0
    settings = Settings()
    sent = asyncio.run(publish(programme, settings, rate=args.rate, progress=_progress_printer()))
    summary = ", ".join(f"{settings.topic(t)}={n}" for t, n in sent.items())
    print(f"sent {sum(sent.values())} records: {summary}", flush=True)
    return 0


def _build(args: argparse.Namespace) -> Programme:
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    start = datetime.fromisoformat(args.start)
    if args.rate < 0:
        raise ValueError("--rate must be >= 0")
    return build_programme(
        measures,
        catalogue=Catalogue.load(args.catalogue),
        num_patients=args.patients,
        num_cohorts=args.cohorts,
        obs_per_patient=args.obs_per_patient,
        design=DESIGNS[args.design],  # type: ignore[arg-type]
        time_span=args.time_span,
        seed=args.seed,
        start=start,
        bad_fraction=args.bad_fraction,
        duplicate_fraction=args.duplicate_fraction,
        alternative_unit_fraction=args.alternative_unit_fraction,
    )


def _message(error: Exception) -> str:
    if isinstance(error, UnknownMeasure):
        return f"unknown measure {error.args[0]!r} (see streams/measures.toml)"
    first = getattr(error, "errors", None)
    if callable(first):  # pydantic ValidationError: the first problem is enough
        problem = error.errors()[0]  # type: ignore[attr-defined]
        return f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}"
    return str(error)


def _progress_printer(every: float = 1.0) -> Callable[[int, int, float, bool], None]:
    last = [0.0]

    def report(sent: int, total: int, elapsed: float, final: bool) -> None:
        now = time.monotonic()
        if final or now - last[0] >= every:
            last[0] = now
            rate = sent / elapsed if elapsed > 0 else 0.0
            print(f"sent {sent}/{total} events ({rate:,.0f} events/s)", flush=True)

    return report


async def publish(
    programme: Programme,
    settings: Settings,
    *,
    rate: float = 0.0,
    progress: Callable[[int, int, float, bool], None] | None = None,
) -> dict[str, int]:
    """Send the programme's records in ``Programme.send_order()``: enrolments
    (all acknowledged) before readings, at most ``rate`` records per second
    (0: unlimited). Returns records acknowledged per unprefixed topic; raises
    the producer's error if any send fails."""
    from aiokafka import AIOKafkaProducer

    from streams.kafka_options import aiokafka_options, start_client
    from streams.topics import ensure_topics

    ordered = programme.send_order()
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        **aiokafka_options(settings),
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await start_client(producer, settings)
    counts: dict[str, int] = {}
    started = time.monotonic()
    sent = 0
    partition_of = _Partitioner(producer)
    chunk_size = CHUNK if rate <= 0 else max(1, min(CHUNK, int(rate / 10)))
    try:
        enrolments = [r for r in ordered if r.topic == "enrollments"]
        readings = ordered[len(enrolments) :]
        for phase in (enrolments, readings):
            pending: list[asyncio.Future] = []
            for offset in range(0, len(phase), chunk_size):
                chunk = phase[offset : offset + chunk_size]
                futures = await _send_batched(producer, settings, chunk, partition_of)
                await asyncio.gather(*pending)  # the previous chunk: keeps one chunk in flight
                pending = futures
                sent += len(chunk)
                for record in chunk:
                    counts[record.topic] = counts.get(record.topic, 0) + 1
                if rate > 0:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if progress:
                    progress(sent, len(ordered), time.monotonic() - started, False)
            await asyncio.gather(*pending)  # enrolments are acknowledged before any reading
    finally:
        await producer.stop()
    if progress:
        progress(sent, len(ordered), time.monotonic() - started, True)
    return counts


class _Partitioner:
    """The default (murmur2, Java-compatible) partition of a key, cached per key."""

    def __init__(self, producer) -> None:
        from aiokafka.partitioner import DefaultPartitioner

        self._producer = producer
        self._partitioner = DefaultPartitioner()
        self._cache: dict[tuple[str, bytes | None], int] = {}

    async def __call__(self, topic: str, key: bytes | None) -> int:
        cached = self._cache.get((topic, key))
        if cached is None:
            partitions = sorted(await self._producer.partitions_for(topic))
            cached = self._partitioner(key, partitions, partitions)
            if key is not None:
                self._cache[(topic, key)] = cached
        return cached


async def _send_batched(
    producer, settings: Settings, records: Sequence[Record], partition_of: _Partitioner
) -> list[asyncio.Future]:
    """Hand ``records`` to the producer as whole batches, one per (topic,
    partition) group in record order (a partition's order is kept: the producer
    has one request in flight per partition). Returns the batches' futures."""
    groups: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        topic = settings.topic(record.topic)
        groups.setdefault((topic, await partition_of(topic, record.key)), []).append(record)
    futures = []
    for (topic, partition), group in groups.items():
        batch = producer.create_batch()
        for record in group:
            if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                    raise ValueError(
                        f"a record of {len(record.value)} bytes exceeds the batch size"
                    )
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures
