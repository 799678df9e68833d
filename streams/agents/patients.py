"""patients: partitioned by patient. Reads the raw topics (enrollments,
wearables, labs, pros) itself, one event per fetched partition chunk
(streams.chunked_consumer), in batches of records, validates each
record (streams.validation) and dead-letters the bad ones with their original
bytes, applies the rest to the patient's record in the changelogged
``patients`` table (streams.patient_state), rescores the touched patients under
the current population posterior, publishes scores that changed materially and
responder transitions, and forwards the touched patients' whole statistics to
the population agent, one message per measure and batch. Every reading is also
scored against its posterior predictive (model.predictive) for the prior-data
conflict detector.

Validation runs here, not in an agent of its own that forwards to an internal
topic: that hop cost a produce and a consume per record and left this agent
batches of a few dozen events.

The table's changelog is partitioned by key with Kafka's default partitioner
(``KeyPartitionedTable``): producers key every raw record by the patient id
(validation checks it), so the changelog partition of a patient equals the
partition its events arrive on, also when a batch mixes partitions and topics,
and the rescoring task can update the table outside of stream iteration.
Faust's assignor gives one worker the same partition of every topic with the
same partition count, so a patient's raw topics and table partition move together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
import numpy as np

from model.config import DecisionRule, ModelConfig
from monitoring.drift import PriorDataConflictDetector
from streams import stall_watch
from streams.agents.drift import conflict_alert
from streams.catalogue import Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.consumer_seek import fetched_since_rebalance
from streams.joint_stream import joint_models
from streams.output import DeliveryFailed, Producer, delivered, stop_now
from streams.partitioning import key_partition
from streams.patient_state import PatientRecord
from streams.patient_step import (
    RecordCache,
    StepContext,
    StepOutputs,
    batch_keys,
    by_patient,
    process_batch,
    rescore,
    rescore_joint,
    step_bounds,
)
from streams.posterior_feed import PosteriorBook
from streams.rescore_queue import ChunkBudget, RawBacklog, RescoreQueue
from streams.schemas import json_bytes
from streams.scoring import PendingReading
from streams.settings import Settings
from streams.stores import KeyCounts, PartitionedByKey
from streams.telemetry import CallTally, Telemetry
from streams.topics import Topics

log = logging.getLogger(__name__)


class KeyPartitionedTable(PartitionedByKey):
    """A table whose changelog partition (and RocksDB database) is the key's
    partition by Kafka's default partitioner, not the partition of the event
    being processed: a batch (``take_events``) mixes partitions and the
    rescoring task writes outside of stream iteration (streams.stores). Faust's
    own ``use_partitioner`` asks the producer, which has no metadata for a
    changelog topic it has not yet written to."""

    def partition_for_key(self, key: str) -> int:
        return key_partition(key.encode(), self.partitions or self.app.conf.topic_partitions)


class PatientsService:
    """The patients agent: loads the states a batch names, calls the pure step
    (streams.patient_step), saves what it changed and sends what it caused."""

    def __init__(
        self,
        app: faust.App,
        topics: Topics,
        catalogue: Catalogue,
        models: dict[str, ModelConfig],
        posteriors: PosteriorBook,
        settings: Settings,
        telemetry: Telemetry,
        rule: DecisionRule | None = None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        # Rescoring waits while this holds (streams.app: while the population
        # agent takes over measures, PopulationService.taking_over).
        self.paused = paused
        self.topics = topics
        self.settings = settings
        self.telemetry = telemetry
        self.context = StepContext(
            catalogue, models, posteriors, settings, rule or DecisionRule(),
            joint=joint_models(catalogue, models),
        )  # fmt: skip
        # This worker's latest published call per measure and patient (for the
        # classification gauges; rebuilt as patients are rescored after a restart).
        self.calls: dict[str, CallTally] = defaultdict(CallTally)
        self.conflicts: dict[str, PriorDataConflictDetector] = {}  # per measure
        self.table = KeyPartitionedTable.register(app, "patients", settings.partitions)
        self.producer = Producer(app)
        self.cache = RecordCache(settings.state_cache_mb * 2**20)
        self.rescore_budget = ChunkBudget()  # patients per rescoring chunk
        self.backlog = RawBacklog(settings.batch_size)
        # Patients held in the partitions this worker owns (the tracked gauge):
        # faust's len(table) reads every RocksDB key, ~1 s per 100k patients.
        self.held = KeyCounts(self.table.partition_for_key)
        self._counted_generation: int | None = None  # the consumer generation counted in

    def load(self, patient_id: str) -> PatientRecord | None:
        raw = self.table.values_of([patient_id])[patient_id]
        return PatientRecord.model_validate_json(raw) if raw else None

    async def process_chunks(self, events: list[faust.EventT]) -> list[Awaitable[None]]:
        """Process a batch of chunk events in steps of at most ``batch_size``
        records and ``batch_patients`` patients (streams.patient_step.step_bounds);
        returns each step's settlement (``process``): the events may be
        acknowledged once every one of them has completed.

        faust's stream drops an event of an earlier consumer generation when it
        enters the stream, not when the agent gets to it: a batch taken before a
        rebalance can reach its turn after it. Its records are dropped here
        (``current_records``), just before the step that would apply them (no
        await in between): the partition may be another worker's by now, and
        applying them would publish this worker's stale copy of the patient after
        the owner's newer score and changelog record. They were never acked
        (streams.consumer_seek), so the partition's owner fetches them again."""
        settings = self.settings
        pending = [(event.message, record) for event in events for record in event.value.records()]
        # The take is acknowledged as a whole once all its steps settle: the
        # order across patients is free (streams.patient_step.by_patient).
        pending = by_patient(pending, lambda item: item[1].key)
        self.observe_backlog(events)
        settlements = []
        start = 0
        keys = [record.key for _, record in pending]
        for end in step_bounds(keys, settings.batch_size, settings.batch_patients):
            # a backfill's take holds every chunk faust buffered: minutes of steps
            self.backlog.in_hand = len(pending) - start
            self.telemetry.raw_backlog(self.backlog.records(time.monotonic()))
            records, stale = current_records(self.app, pending[start:end])
            start = end
            if stale:
                log.info("dropped %d records fetched before a rebalance", stale)
            if records:
                settlements.append(await self.process(records))
        self.backlog.in_hand = 0
        return settlements

    def observe_backlog(self, events: list[faust.EventT]) -> None:
        """Note the raw records still in Kafka behind each partition's last
        chunk of ``events`` (``backlog``; the records in hand are counted step
        by step in process_chunks, which reports the gauge)."""
        now = time.monotonic()
        last: dict[Any, int] = {}
        for event in events:  # a chunk's message offset is its last record's
            message = event.message
            last[message.tp] = max(last.get(message.tp, -1), message.offset)
        for tp, offset in last.items():
            try:
                end = self.app.consumer.highwater(tp)
            except Exception:  # not assigned any more, or no fetch answered yet
                end = None
            self.backlog.observe(tp, offset + 1, end, now)

    def backlogged(self) -> bool:
        return self.backlog.backlogged(time.monotonic())

    async def process(self, events: list[ChunkRecord]) -> Awaitable[None]:
        """Apply a batch of raw records (streams.patient_step.process_batch) and
        send what it caused; returns its settlement, which completes once all of
        that is in Kafka (``send``). The next batch need not wait for it: the
        agent acknowledges a batch's events only after its settlement, so no
        offset is committed past output that is not yet written.

        Load, step and save run without an await, so the rescoring after a new
        posterior (``rescore_all``, another task) never sees or writes a record
        this batch has loaded but not yet saved."""
        started = time.perf_counter()
        states = self.table.values_of(batch_keys(events))
        stages: dict[str, float] = {}
        saves, outputs = process_batch(
            states, events, self.context, times=stages, cache=self.cache, clock=time.thread_time
        )
        self.telemetry.step_stages(stages)
        self.report_cache()
        self.held.added(key for key in saves if states.get(key) is None)
        settled = await self.send(saves, outputs, "evidence")
        try:
            await self.check_conflict(outputs.readings, outputs.residuals)
        except Exception:  # monitoring must never stop the stream
            log.exception("the prior-data conflict check failed")
        telemetry = self.telemetry
        for source, count in outputs.accepted.items():
            telemetry.accepted(source, count)
        telemetry.replays(outputs.replays)
        self.report_held()
        telemetry.batch(len(events), time.perf_counter() - started)

        async def scored() -> None:
            await settled
            now = time.time()
            arrival = outputs.arrival
            telemetry.event_to_score([now - arrival[p] for p in outputs.scored_patients()
                                      if p in arrival])  # fmt: skip

        return asyncio.ensure_future(scored())

    async def write(self, saves: dict[str, bytes], outputs: StepOutputs, trigger: str) -> None:
        """``send``, then wait until all of it is in Kafka."""
        await (await self.send(saves, outputs, trigger))

    async def send(
        self, saves: dict[str, bytes], outputs: StepOutputs, trigger: str
    ) -> Awaitable[None]:
        """Save a step's new states and send what it caused (dead letters,
        evidence, transition alerts, scores) in one ordered section
        (streams.stores.PartitionedByKey.write_many: the rescoring task's
        outputs never overtake a batch's, nor the reverse). Returns the
        settlement: a task that completes when all of it is in Kafka. A failed
        delivery stops the worker before the events that caused it are
        acknowledged, so their offsets are never committed past state or output
        that was lost. ``trigger`` says why scores were published ("evidence"
        or "population")."""
        topics = self.topics
        caused = [(topic, m.key, m.value, m.partition) for topic, m in outputs.reroutes]
        for topic, messages in (
            (topics.deadletter, outputs.dead_letters),
            (topics.population_evidence, outputs.evidence),
            (topics.alerts, outputs.alerts),
            (topics.scores, outputs.scores),
        ):
            name = topic.get_topic_name()
            caused.extend((name, m.key, m.value, m.partition) for m in messages)
        futures = await self.table.write_many(saves, self.producer, caused)

        async def settle() -> None:
            try:
                await delivered(futures)
            except DeliveryFailed as error:
                stop_now(error)
            for (source, reason), count in outputs.rejected.items():
                self.telemetry.rejected(source, reason, count)
            for source, count in outputs.rerouted.items():
                self.telemetry.rerouted(source, count)
            self.telemetry.scores_published(len(outputs.scores), trigger)
            for measure, calls in outputs.calls.items():
                tally = self.calls[measure]
                tally.update(calls)
                self.telemetry.classifications(measure, tally.counts)

        return asyncio.ensure_future(settle())

    async def check_conflict(
        self,
        readings: dict[str, list[PendingReading]],
        residuals: Mapping[str, Callable[[], np.ndarray]],
    ) -> None:
        """Feed the batch's standardised posterior-predictive residuals (its
        step's ``residuals`` of its ``readings``, streams.patient_step) to each
        measure's prior-data conflict detector (monitoring.drift); alert on the
        alerts topic when it fires. A per-worker CUSUM over its own patients:
        no patient is named in the alert, the metric or the log."""
        posteriors = self.context.posteriors
        for measure, batch in readings.items():
            if measure not in residuals:  # could not be computed (logged by the step)
                continue
            detector = self.conflicts.get(measure)
            if detector is None:
                detector = self.conflicts[measure] = PriorDataConflictDetector.from_config(
                    self.settings.drift
                )
            detected = False
            for reading, z in zip(batch, residuals[measure]().tolist(), strict=True):
                detector.update(z)
                if detector.drift_detected:
                    detected = True
                    version = posteriors[measure].version
                    alert = conflict_alert(measure, detector, version, reading.origin)
                    log.warning("%s", alert.message)
                    await self.producer.send(
                        self.topics.alerts.get_topic_name(),
                        measure.encode(),
                        json_bytes(alert),
                    )
            self.telemetry.conflict(measure, detector.statistic, detected)

    async def count_held(self) -> None:
        """Count the patients of the partitions this worker owns (each again
        after a rebalance, once recovered; a chunk of keys at a time between
        yields to the event loop) and report the gauge."""
        if self.app.rebalancing:
            return
        generation = self.app.consumer_generation_id
        if generation != self._counted_generation:
            # a partition may have been another worker's and come back since
            self.held.forget()
            self._counted_generation = generation
        await self.held.count(self.table, self.active_partitions(), COUNT_CHUNK)
        self.report_held()

    async def keep_held_counted(self) -> None:
        """``count_held`` every COUNT_INTERVAL_SECONDS, forever."""
        while True:
            await self.count_held()
            await asyncio.sleep(COUNT_INTERVAL_SECONDS)

    def report_held(self) -> None:
        held = self.held.total(self.active_partitions())
        if held is not None:
            self.telemetry.tracked(held)

    def active_partitions(self) -> set[int]:
        """The patient partitions (of the raw topics and the patients table) this
        worker actively owns now."""
        topic = self.topics.wearables.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def turn_to_rescore(self, defer_until: float = 0.0) -> None:
        """Wait while a rebalance is under way (between the revocation and the end
        of recovery faust's assignment is the old one) or rescoring is paused
        (the population agent is taking over measures: its rebuilds and fits
        come first, and bring the posteriors that supersede this rescoring),
        and until ``defer_until`` (monotonic) while the raw topics have a
        backlog (streams.rescore_queue)."""
        while (
            self.app.rebalancing
            or self.paused()
            or (time.monotonic() < defer_until and self.backlogged())
        ):
            await asyncio.sleep(REBALANCE_POLL_SECONDS)

    async def rescore_queued(self, queue: RescoreQueue) -> None:
        """Run ``queue``'s rescoring passes as they fall due, forever
        (streams.rescore_queue): each under the newest posterior held when
        each chunk is scored, deferring to a raw backlog up to the request's
        deadline, also between chunks."""
        while True:
            request = queue.take_due(time.monotonic(), self.backlogged())
            if request is None:
                await asyncio.sleep(REBALANCE_POLL_SECONDS)
                continue
            started = time.monotonic()
            step = rescore_joint if request.joint else rescore
            count = await self.rescore_all(
                request.key, request.force, step, defer_until=queue.deadline(request)
            )
            queue.done(request, time.monotonic() - started)
            posteriors = self.context.posteriors
            if request.joint:
                log.info("joint posterior %s v%d: %d scores republished", request.key,
                         posteriors.joint_version(request.key), count)  # fmt: skip
            else:
                log.info("posterior %s v%d: rescored, %d scores republished", request.key,
                         posteriors.version(request.key), count)  # fmt: skip

    def report_cache(self) -> None:
        """The record cache's totals to the metrics (after each batch and chunk)."""
        cache = self.cache
        self.telemetry.state_cache(cache.hits, cache.misses, cache.bytes)

    async def rescore_all(
        self, measure: str, force: bool = False, step=rescore, defer_until: float = 0.0
    ) -> int:
        """After a new population posterior: rescore every local patient with
        evidence on ``measure`` (streams.patient_step.rescore; ``step``
        rescore_joint with a joint group's name for ``measure``) and publish what
        changed materially (everything when ``force``: the posterior itself moved
        materially). A partition at a time, its keys listed a chunk at a time
        (``partition_keys``), in chunks sized to hold the event loop for about
        0.1 s each (``ChunkBudget``), each loaded, scored and saved without an
        await (a batch of the agent may have saved a patient since the keys were
        listed), so memory stays bounded by a chunk however many patients.
        Returns the number of scores published.

        The local store also holds standby replicas and partitions this worker
        owned before a rebalance: rescoring (and saving) those would overwrite
        the owner's newer state, and its latest score, with a stale copy. So a
        chunk is scored only while this worker owns its partition at that
        moment, after waiting for its turn (``turn_to_rescore``, with
        ``defer_until``)."""
        published = 0
        for partition in range(self.settings.partitions):
            if partition not in self.active_partitions():
                continue
            keys = self.table.partition_keys(partition)  # as of now: new patients are scored
            while True:
                await self.turn_to_rescore(defer_until)
                # From here to the table writes there is no await: the ownership
                # read is the one the chunk is saved under.
                if partition not in self.active_partitions():
                    break
                started = time.perf_counter()
                chunk = list(itertools.islice(keys, self.rescore_budget.size))
                if not chunk:
                    break
                states = self.table.values_of(chunk)
                saves, outputs = step(states, measure, self.context, force, cache=self.cache)
                self.rescore_budget.record(len(chunk), time.perf_counter() - started)
                self.report_cache()
                await self.write(saves, outputs, "population")
                published += len(outputs.scores)
        return published


def current_records(
    app: faust.App, pending: list[tuple[Any, ChunkRecord]]
) -> tuple[list[ChunkRecord], int]:
    """The records of ``pending`` (message, record) pairs whose message was
    fetched since the latest rebalance (streams.consumer_seek), and how many
    were not."""
    records = [record for message, record in pending if fetched_since_rebalance(app, message)]
    return records, len(pending) - len(records)


COUNT_CHUNK = 10_000  # keys counted between yields to the event loop (~0.1 s)
COUNT_INTERVAL_SECONDS = 5.0  # how often the worker looks for partitions to count
REBALANCE_POLL_SECONDS = 0.1  # how often a rescore waiting for its turn looks again


def register(app: faust.App, service: PatientsService) -> None:
    settings = service.settings
    raw = app.topic(
        *(topic.get_topic_name() for topic in service.topics.raw),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,
    )

    # One event per fetched partition chunk (streams.chunked_consumer), processed in
    # steps of at most ``batch_size`` records. A batch takes up to ``batch_size``
    # chunks, not one per raw partition: when records trickle in, every fetch
    # brings chunks of a few records, a backlog waits in faust's stream buffer as
    # thousands of such chunks, and batches of one chunk per partition (tens of
    # records) never caught up, each paying a step's fixed cost. The chunks are
    # in memory already; this only groups them.
    chunks_per_batch = max(len(service.topics.raw) * settings.partitions, settings.batch_size)

    async def patients(stream: faust.StreamT) -> None:
        # Batches are pipelined: the next is processed while the earlier ones'
        # records are still being written (waiting for each write left the agent
        # idle for a broker round trip per batch). A batch's events are
        # acknowledged (``noack_take``: by us, not faust) only once everything it
        # caused is in Kafka, so the committed offsets never pass unwritten
        # output; at most IN_FLIGHT_BATCHES are unsettled at a time.
        in_flight: deque[asyncio.Future] = deque()

        async def settle(settlements: list[Awaitable[None]], events: list[faust.EventT]) -> None:
            for settlement in settlements:
                await settlement
            for event in events:
                await stream.ack(event)

        try:
            async for events in stream.noack_take(chunks_per_batch, within=settings.batch_seconds):
                while in_flight and (in_flight[0].done() or len(in_flight) >= IN_FLIGHT_BATCHES):
                    await in_flight.popleft()
                settlements = await service.process_chunks(events)
                in_flight.append(asyncio.ensure_future(settle(settlements, events)))
        finally:
            # A clean stop acknowledges what is written by now (the rest is read
            # again by the next owner and recognised as replays); a broker that
            # stopped must not hold the shutdown.
            if in_flight:
                await asyncio.wait(list(in_flight), timeout=SETTLE_ON_STOP_SECONDS)

    app.agent(raw, name="patients")(patients)
    stall_watch.install(app, raw.topics, STALL_WATCH_SECONDS)


IN_FLIGHT_BATCHES = 4  # batches whose writes may be pending while the agent goes on
SETTLE_ON_STOP_SECONDS = 5.0  # how long a stopping agent waits for its pending writes
STALL_WATCH_SECONDS = 10.0  # how often streams.stall_watch checks the raw partitions
