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
batches of a few dozen events (benchmarks/README.md, section 6).

The table's changelog is partitioned by key with Kafka's default partitioner
(``KeyPartitionedTable``): producers key every raw record by the patient id
(validation checks it), so the changelog partition of a patient equals the
partition its events arrive on, also when a batch mixes partitions and topics,
and the rescoring task can update the table outside of stream iteration.
Faust's assignor gives one worker the same partition of every topic with the
same partition count, so a patient's raw topics and table partition move together.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

import faust
from aiokafka.partitioner import DefaultPartitioner

from model.config import DecisionRule, ModelConfig
from monitoring.drift import PriorDataConflictDetector
from streams import stall_watch
from streams.agents.drift import conflict_alert
from streams.catalogue import Catalogue
from streams.chunked_consumer import ChunkRecord
from streams.patient_state import PatientRecord, apply_event, origin_key, patient_evidence
from streams.posterior_feed import PosteriorBook
from streams.schemas import (
    Alert,
    EnrollmentRecord,
    EvidenceBatch,
    MeasureScore,
    Observation,
    Origin,
    PatientEvidence,
)
from streams.scoring import (
    PendingReading,
    changed_materially,
    efficacy_score,
    measure_scores,
    pending_reading,
    published_of,
    reading_residuals,
)
from streams.settings import Settings
from streams.stores import PartitionedByKey
from streams.telemetry import Telemetry
from streams.topics import Topics
from streams.validation import Rejected, dead_letter, validate_record

log = logging.getLogger(__name__)


_PARTITIONER = DefaultPartitioner()


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client and
    aiokafka) gives ``key``: where the patient's events land on every topic."""
    all_partitions = list(range(partitions))
    return _PARTITIONER(key, all_partitions, all_partitions)


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
    """The patients agent's logic, bound to its table and topics."""

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
    ) -> None:
        self.app = app
        self.topics = topics
        self.catalogue = catalogue
        self.models = models
        self.posteriors = posteriors
        self.settings = settings
        self.telemetry = telemetry
        self.rule = rule or DecisionRule()
        self.weights = {name: spec.weight for name, spec in catalogue.measures.items()}
        # This worker's latest published call per measure and patient (for the
        # classification gauges; rebuilt as patients are rescored after a restart).
        self.calls: dict[str, dict[str, str]] = defaultdict(dict)
        self.conflicts: dict[str, PriorDataConflictDetector] = {}  # per measure
        self.table = KeyPartitionedTable.register(app, "patients", settings.partitions)

    def load(self, patient_id: str) -> PatientRecord | None:
        raw = self.table.get(patient_id)
        return PatientRecord.model_validate_json(raw) if raw else None

    def save(self, record: PatientRecord) -> None:
        self.table[record.patient_id] = record.model_dump_json().encode()

    def validate(
        self,
        events: list[ChunkRecord],
        rejections: list[tuple[ChunkRecord, str, str, tuple[str, int, int]]],
    ) -> list[tuple[ChunkRecord, Observation | EnrollmentRecord]]:
        """The valid raw records of a batch as the events to apply; the others
        go to ``rejections`` (dead-lettered with their original bytes)."""
        now = datetime.now(UTC)
        valid = []
        accepted: Counter[str] = Counter()
        for event in events:
            message = event.message
            source = self.settings.source_of(message.topic)
            origin = Origin(
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                timestamp=message.timestamp,
            )
            try:
                parsed = validate_record(
                    source, event.key, event.value, origin, self.catalogue, self.settings, now
                )
            except Rejected as rejected:
                log.debug("rejected %s:%s: %s", message.topic, message.offset, rejected)
                rejections.append(
                    (
                        event,
                        rejected.reason,
                        rejected.detail,
                        (message.topic, message.partition, message.offset),
                    )
                )
                continue
            accepted[source] += 1
            valid.append((event, parsed))
        for source, count in accepted.items():
            self.telemetry.accepted(source, count)
        return valid

    async def process(self, events: list[ChunkRecord]) -> None:
        """Apply a batch of events, rescore once per touched patient, save each
        touched record once, then send what the batch caused (dead letters,
        evidence, scores, alerts).

        Everything up to the saves runs without an await, so the rescoring after
        a new posterior (``rescore_all``, another task) never sees or writes a
        record this batch has loaded but not yet saved."""
        started = time.perf_counter()
        records: dict[str, PatientRecord] = {}
        touched: dict[str, set[str]] = defaultdict(set)
        evidence_changed: set[str] = set()
        arrival: dict[str, float] = {}  # earliest raw-record timestamp (s) per patient
        replayed: set[str] = set()
        readings: dict[str, list[PendingReading]] = defaultdict(list)  # for conflict checks
        rejections: list[tuple[ChunkRecord, str, str, tuple[str, int, int]]] = []
        for event, parsed in self.validate(events, rejections):
            patient_id = parsed.patient_id
            try:
                before = records.get(patient_id)
                fresh = before is None  # parsed just now: nobody else holds it
                if fresh:
                    before = self.load(patient_id)
                reading = self.pending(before, parsed)  # never raises
                # A failing event leaves a fresh record half-applied: it is not
                # kept (the next event of the patient loads it again).
                record, outcome = apply_event(before, parsed, self.models, copy=not fresh)
            except Exception as error:  # a bug must not stop the stream or lose the event
                origin = parsed.origin
                log.exception(
                    "could not apply the event from %s:%d:%d",
                    origin.topic,
                    origin.partition,
                    origin.offset,
                )
                rejections.append(
                    (
                        event,
                        "processing_error",
                        f"{type(error).__name__}: {error}",
                        (origin.topic, origin.partition, origin.offset),
                    )
                )
                continue
            records[patient_id] = record
            if reading is not None and parsed.measure in outcome.touched:
                readings[parsed.measure].append(reading)
            touched[patient_id] |= outcome.touched
            if outcome.cohort_changed:
                touched[patient_id] |= set(record.measures)
            if outcome.touched or outcome.cohort_changed:
                evidence_changed.add(patient_id)
                if parsed.origin.timestamp is not None:
                    arrival.setdefault(patient_id, parsed.origin.timestamp)
            for rejected, reason, detail in outcome.rejected:
                origin = rejected.origin
                rejections.append(
                    (event, reason, detail, (origin.topic, origin.partition, origin.offset))
                )
            self.telemetry.replays(outcome.replays)
            if outcome.replays:
                replayed.add(patient_id)
        # A replay means a worker stopped between applying events and committing
        # their offsets: the state's changelog may have been written while the
        # evidence forward or the score it caused was lost. Both are idempotent
        # (last write wins), so send them again rather than risk losing them.
        to_score = [records[p] for p in records if touched[p] or p in replayed]
        try:
            publications = self.score(to_score, forced=replayed)
        except Exception:  # the evidence is saved and forwarded all the same
            log.exception("scoring a batch of %d patients failed", len(to_score))
            publications = []
        for record in records.values():
            self.save(record)
        for rejection in rejections:
            await self.reject(*rejection)
        # A replayed patient's evidence is re-sent for every measure (see above).
        forwards = {p: touched[p] for p in evidence_changed}
        for patient_id in replayed - evidence_changed:
            forwards[patient_id] = set(records[patient_id].measures)
        await self.forward_evidence([(records[p], measures) for p, measures in forwards.items()])
        scored = await self.publish(publications, "evidence")
        try:
            await self.check_conflict(readings)
        except Exception:  # monitoring must never stop the stream
            log.exception("the prior-data conflict check failed")
        self.telemetry.tracked(len(self.table))
        self.telemetry.batch(len(events), time.perf_counter() - started)
        now = time.time()
        self.telemetry.event_to_score([now - arrival[p] for p in scored if p in arrival])

    def pending(self, record: PatientRecord | None, event) -> PendingReading | None:
        """The reading ``event`` with its patient's evidence before it, when a
        prior-data conflict check applies (an enrolled patient, a posterior, a
        reading not older than the patient's latest)."""
        if not isinstance(event, Observation) or record is None or not record.enrolled:
            return None
        if event.measure not in self.posteriors:
            return None
        try:
            return pending_reading(
                record, event.measure, event.event_time, event.value, origin_key(event.origin)
            )
        except Exception:  # monitoring must never dead-letter a valid reading
            log.exception("could not prepare a reading's predictive check")
            return None

    async def check_conflict(self, readings: dict[str, list[PendingReading]]) -> None:
        """Feed the batch's standardised posterior-predictive residuals to each
        measure's prior-data conflict detector (monitoring.drift); alert on the
        alerts topic when it fires. A per-worker CUSUM over its own patients:
        no patient is named in the alert, the metric or the log."""
        for measure, batch in readings.items():
            posterior = self.posteriors[measure]
            residuals = reading_residuals(posterior, batch, self.models[measure])
            detector = self.conflicts.get(measure)
            if detector is None:
                detector = self.conflicts[measure] = PriorDataConflictDetector.from_config(
                    self.settings.drift
                )
            detected = False
            for reading, z in zip(batch, residuals, strict=True):
                detector.update(float(z))
                if detector.drift_detected:
                    detected = True
                    alert = conflict_alert(measure, detector, posterior.version, reading.origin)
                    log.warning("%s", alert.message)
                    await self.topics.alerts.send(
                        key=measure.encode(), value=alert.model_dump_json().encode()
                    )
            self.telemetry.conflict(measure, detector.statistic, detected)

    async def reject(
        self, event: ChunkRecord, reason: str, detail: str, origin: tuple[str, int, int]
    ) -> None:
        """Dead-letter a raw record (its original key and bytes) with the reason;
        ``origin`` is where it was read (topic, partition, offset)."""
        topic, partition, offset = origin
        letter = dead_letter(reason, detail, topic, partition, offset, event.key, event.value)
        await self.topics.deadletter.send(key=event.key, value=letter.model_dump_json().encode())
        self.telemetry.rejected(self.settings.source_of(topic), reason)

    async def forward_evidence(self, changes: list[tuple[PatientRecord, set[str]]]) -> None:
        """Send the whole statistics of each (patient, changed measures) to the
        population agent: per measure, one EvidenceBatch of up to EVIDENCE_CHUNK
        patients, on the measure's partition (one owner per measure)."""
        by_measure: dict[str, list[PatientEvidence]] = defaultdict(list)
        for record, measures in changes:
            for measure in measures:
                evidence = patient_evidence(record, measure, self.models[measure])
                if evidence is not None:
                    by_measure[measure].append(evidence)
        for measure, items in by_measure.items():
            for start in range(0, len(items), EVIDENCE_CHUNK):
                batch = EvidenceBatch(measure=measure, items=items[start : start + EVIDENCE_CHUNK])
                await self.topics.population_evidence.send(
                    key=measure.encode(),
                    value=batch.model_dump_json().encode(),
                    partition=measure_partition(measure, self.settings.partitions),
                )

    def score(
        self, records: list[PatientRecord], forced: Collection[str] = ()
    ) -> list[Publication]:
        """Score ``records`` (every measure with a posterior) under the current
        posteriors and, for those whose score changed materially (or whose id is
        in ``forced``), record the new score in the record: ``published`` and
        ``published_score``. The records are modified in place, not saved;
        returns what to send."""
        by_measure: dict[str, list[PatientRecord]] = defaultdict(list)
        for record in records:
            if record.cohort is None:
                continue
            for measure in record.measures:
                if measure in self.posteriors:
                    by_measure[measure].append(record)
        new_scores: dict[str, dict] = defaultdict(dict)
        for measure, group in by_measure.items():
            posterior = self.posteriors[measure]
            scores = measure_scores(
                posterior,
                [r.measures[measure] for r in group],
                [r.cohort for r in group],
                self.catalogue.get(measure),
                self.models[measure],
                self.rule,
                pathways=self.settings.pathways,
                previous=[
                    r.published[measure].classification if measure in r.published else None
                    for r in group
                ],
            )
            for record, score in zip(group, scores, strict=True):
                new_scores[record.patient_id][measure] = score
        by_id = {r.patient_id: r for r in records}
        publications = []
        for patient_id, scores in new_scores.items():
            record = by_id[patient_id]
            material = patient_id in forced or any(
                changed_materially(record.published.get(m), s) for m, s in scores.items()
            )
            if not material:
                continue
            transitions = []
            for measure, score in scores.items():
                previous = record.published.get(measure)
                if previous is not None and previous.classification != score.classification:
                    transitions.append((previous.classification, score))
                record.published[measure] = published_of(score)
                self.calls[measure][patient_id] = score.classification
            message = efficacy_score(record, list(scores.values()), self.weights, self.rule)
            record.published_score = message.model_dump_json()
            publications.append(Publication(record, transitions))
        for measure in by_measure:
            self.telemetry.classifications(measure, Counter(self.calls[measure].values()))
        return publications

    async def publish(self, publications: list[Publication], trigger: str) -> set[str]:
        """Send the scores (and responder transitions) of ``score``, whose records
        are saved; ``trigger`` says why ("evidence" or "population"). Returns the
        published patient ids."""
        for publication in publications:
            record = publication.record
            for previous_call, score in publication.transitions:
                await self.transition_alert(record, previous_call, score)
            await self.topics.scores.send(
                key=record.patient_id.encode(), value=record.published_score.encode()
            )
        self.telemetry.scores_published(len(publications), trigger)
        return {publication.record.patient_id for publication in publications}

    async def transition_alert(self, record: PatientRecord, previous: str, score) -> None:
        if score.classification not in ("responder", "non_responder"):
            return
        alert = Alert(
            event_id=f"transition:{record.patient_id}:{score.measure}:"
            f"{score.population_version}:{score.count_exposed + score.count_unexposed}",
            event_time=score.last_event_time or datetime.now(UTC),
            kind="transition",
            severity="warning" if score.classification == "non_responder" else "info",
            patient_id=record.patient_id,
            measure=score.measure,
            message=f"{score.measure}: {previous} -> {score.classification}",
            previous=previous,
            current=score.classification,
            recommended_action=score.recommended_action,
            population_version=score.population_version,
            statistics={
                "p_benefit_ge_mcid": score.p_benefit_ge_mcid,
                "p_benefit_gt_0": score.p_benefit_gt_0,
            },
        )
        await self.topics.alerts.send(
            key=record.patient_id.encode(), value=alert.model_dump_json().encode()
        )

    def active_partitions(self) -> set[int]:
        """The patient partitions (of the raw topics and the patients table) this
        worker actively owns now."""
        topic = self.topics.wearables.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def rescore_all(self, measure: str, force: bool = False) -> int:
        """After a new population posterior: rescore every local patient with
        evidence on ``measure`` and publish what changed materially (everything
        when ``force``: the posterior itself moved materially). In chunks of
        RESCORE_CHUNK patients, each loaded, scored and saved without an await
        (a batch of the agent may have saved a patient since the keys were
        listed), so memory stays bounded by a chunk however many patients."""
        owned = self.active_partitions()
        # The local store also holds standby replicas and partitions this worker
        # owned before a rebalance: rescoring (and saving) those would overwrite
        # the owner's newer state with a stale copy.
        keys = [
            key
            for key in list(self.table.keys())
            if key_partition(key.encode(), self.settings.partitions) in owned
        ]
        published = 0
        for start in range(0, len(keys), RESCORE_CHUNK):
            chunk = []
            for key in keys[start : start + RESCORE_CHUNK]:
                record = self.load(key)
                if record is not None and measure in record.measures:
                    chunk.append(record)
            publications = self.score(chunk, forced={r.patient_id for r in chunk} if force else ())
            for publication in publications:
                self.save(publication.record)
            published += len(await self.publish(publications, "population"))
        return published


@dataclass
class Publication:
    """A score to send: the record holding it (``published_score``) and the
    responder transitions it makes, (previous call, new MeasureScore)."""

    record: PatientRecord
    transitions: list[tuple[str, MeasureScore]]


RESCORE_CHUNK = 4096  # patients loaded and scored at a time after a new posterior
EVIDENCE_CHUNK = 1000  # patients per EvidenceBatch message (~0.5 MB of JSON at most)


def measure_partition(measure: str, partitions: int) -> int:
    """The population-evidence partition of a measure (stable across processes)."""
    return zlib.crc32(measure.encode()) % partitions


def register(app: faust.App, service: PatientsService) -> None:
    settings = service.settings
    raw = app.topic(
        *(topic.get_topic_name() for topic in service.topics.raw),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,
    )

    # One event per fetched partition chunk (streams.chunked_consumer): a batch
    # takes at most one chunk of every raw partition, and is processed in steps of
    # at most ``batch_size`` records.
    chunks_per_batch = len(service.topics.raw) * settings.partitions

    async def patients(stream: faust.StreamT) -> None:
        async for events in stream.take_events(chunks_per_batch, within=settings.batch_seconds):
            records = [record for event in events for record in event.value.records()]
            for start in range(0, len(records), settings.batch_size):
                await service.process(records[start : start + settings.batch_size])

    app.agent(raw, name="patients")(patients)
    stall_watch.install(app, raw.topics, STALL_WATCH_SECONDS)


STALL_WATCH_SECONDS = 10.0  # how often streams.stall_watch checks the raw partitions
