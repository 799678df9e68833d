"""The patients agent's work as pure steps: ``(states, events) -> (states, outputs)``.

``process_batch`` takes the serialised table values of the patients a batch of
raw records names and the records themselves, and returns the new table values
of the patients it changed and everything the batch causes: dead letters (with
the original bytes and where they were read), population evidence, scores,
responder-transition alerts, the readings for the prior-data conflict check, and
the metric deltas. ``rescore`` does the same for the patients of a measure after
a new population posterior. Neither touches Kafka, faust, a table or a metric:
the agent (streams/agents/patients.py) loads, calls, saves and sends, and the
tests and benchmarks call the same functions.

The numerics live in model/ (through streams.patient_state and streams.scoring);
this module is the order of things: validate, de-duplicate and apply each event,
score each touched patient once, and serialise what is to be written and sent.
New evidence always republishes the patient's score; after a new posterior only
the scores that changed materially are (streams.scoring.changed_materially), or
all of them when the posterior itself moved materially.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import numpy as np

from model.config import DecisionRule, ModelConfig
from model.joint import JointConfig
from model.scores import EffectSummary
from streams import joint_stream
from streams.catalogue import Catalogue
from streams.partitioning import EvidencePartitions, key_partition
from streams.patient_state import (
    PatientRecord,
    apply_event,
    apply_observations,
    evidence_fields,
    origin_key,
)
from streams.posterior_feed import PosteriorBook
from streams.schemas import (
    Alert,
    EnrollmentRecord,
    Observation,
    Origin,
    bounded_event_id,
    evidence_batch_json,
    json_bytes,
    trusted,
)
from streams.scoring import (
    PendingReading,
    ScoreRow,
    changed_materially,
    dispatch_patients,
    dispatch_reading_residuals,
    efficacy_score_json,
    measure_score_rows,
    pending_reading,
    published_of,
)
from streams.settings import Settings
from streams.validation import Rejected, dead_letter, validate_record

log = logging.getLogger(__name__)

_Item = TypeVar("_Item")

EVIDENCE_CHUNK = 1000  # patients per EvidenceBatch message (~0.5 MB of JSON at most)


def log_failure(message: str, *args: object) -> None:
    """Log a failure of the step (inside an ``except``) at ERROR with the
    exception's type only, and its message and traceback at DEBUG: those can
    hold a patient id (a validation error quotes its input), which logs above
    debug level must not (the dead letter, a data topic, keeps the detail)."""
    error = sys.exc_info()[1]
    log.error(message + " (%s)", *args, type(error).__name__)
    log.debug(message, *args, exc_info=True)


class RawRecord(Protocol):
    """A record as read from a raw topic (streams.chunked_consumer.ChunkRecord)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: float | None


@dataclass(frozen=True)
class StepContext:
    """What the steps read and never change within a batch."""

    catalogue: Catalogue
    models: dict[str, ModelConfig]
    posteriors: PosteriorBook
    settings: Settings
    rule: DecisionRule = field(default_factory=DecisionRule)
    #: Every joint group's model (streams.joint_stream.joint_models), by group.
    joint: dict[str, JointConfig] = field(default_factory=dict)

    @functools.cached_property
    def evidence_partitions(self) -> EvidencePartitions:
        """Each measure's population-evidence partition (its joint group's for a
        measure of one)."""
        return EvidencePartitions.of(self.catalogue, self.settings.partitions)

    @property
    def weights(self) -> dict[str, float]:
        return {name: spec.weight for name, spec in self.catalogue.measures.items()}


@dataclass
class Message:
    """A record to send: key, value and, where it matters, the partition."""

    key: bytes | None
    value: bytes
    partition: int | None = None


@dataclass
class StepOutputs:
    """Everything a step causes besides the new table values.

    Records to send, per topic role: ``dead_letters``, ``reroutes`` (keyed raw
    records that arrived on another partition than their key's, sent unchanged
    to their key's partition of the same topic), ``evidence``
    (population-evidence, on the measure's partition), ``scores`` and ``alerts``
    (responder transitions; conflict alerts come from the conflict check). Metric
    deltas: ``accepted`` and ``rerouted`` (per source), ``rejected`` (per
    (source, reason)),
    ``replays``; ``calls`` (per measure, the published call of each patient
    scored, for the classification gauges); ``arrival`` (the earliest raw-record
    timestamp, in seconds, of each patient whose evidence changed, for the
    event-to-score latency of the scores sent); ``readings`` (per measure, the
    readings for the prior-data conflict check, in arrival order) and
    ``residuals`` (per measure, their standardised residuals as dispatched to
    the device: calling it waits for them)."""

    dead_letters: list[Message] = field(default_factory=list)
    reroutes: list[tuple[str, Message]] = field(default_factory=list)  # (topic, record)
    evidence: list[Message] = field(default_factory=list)
    scores: list[Message] = field(default_factory=list)
    alerts: list[Message] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)
    rerouted: Counter[str] = field(default_factory=Counter)  # per source
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    replays: int = 0
    calls: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    arrival: dict[str, float] = field(default_factory=dict)
    readings: dict[str, list[PendingReading]] = field(default_factory=lambda: defaultdict(list))
    residuals: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)

    def scored_patients(self) -> list[str]:
        return [message.key.decode() for message in self.scores if message.key is not None]


def batch_keys(events: Iterable[RawRecord]) -> list[str]:
    """The table keys a batch may touch: the records' keys (validation requires
    the key to be the patient id; records whose key is not text are rejected)."""
    keys = {}
    for event in events:
        if event.key:
            try:
                keys[event.key.decode()] = None
            except UnicodeDecodeError:
                continue
    return list(keys)


def by_patient(items: Sequence[_Item], key: Callable[[_Item], bytes | None]) -> list[_Item]:
    """``items`` (raw records, or what carries them) grouped by their patient
    ``key``, each patient's in their given order (a stable sort; keyless ones
    first).

    For records that are acknowledged together (the patients agent's take), so
    that only each patient's own order matters. Grouped, a patient with several
    records in a take pays its load, scoring, save and messages once per step
    for all of them (step_bounds then cuts by patient); in the order read, a
    backlog in event-time order names each patient once per step and pays them
    once per record."""
    return sorted(items, key=lambda item: key(item) or b"")


def step_bounds(keys: Sequence[bytes | None], max_records: int, max_patients: int) -> list[int]:
    """Where to cut a run of raw records (their ``keys``, in order) into steps
    of at most ``max_records`` records naming at most ``max_patients``
    patients: the end of each step.

    A step costs per record (parse, apply: ~70 µs) and per patient it touches
    (load, score, evidence, save and their messages: ~150 µs), all of it on
    the event loop. Bounding the patients keeps a step's time bounded whatever
    the records' order; allowing several records per patient lets a backlog
    whose patients recur (device syncs, a small programme) pay the patient's
    costs once for several readings. A record without a key counts as a
    patient of its own (it is rejected, at a record's cost)."""
    ends: list[int] = []
    patients: set[bytes] = set()
    keyless = records = 0
    for position, key in enumerate(keys):
        if (key is None or key not in patients) and len(patients) + keyless >= max_patients:
            ends.append(position)
            patients.clear()
            keyless = records = 0
        if key is None:
            keyless += 1
        else:
            patients.add(key)
        records += 1
        if records >= max_records:
            ends.append(position + 1)
            patients.clear()
            keyless = records = 0
    if records:
        ends.append(len(keys))
    return ends


#: Memory of a cached record per byte of its table value: the parsed record
#: (2.5-2.8 bytes a byte, tracemalloc, 3-30 readings) plus the value itself.
CACHED_BYTES_PER_VALUE_BYTE = 4
#: Probability that a full RecordCache admits a record it did not hand out.
ADMISSION = 0.1


class RecordCache:
    """Parsed patient records kept between batches, each with the exact table
    value it was parsed from or serialised to: a memo of
    ``PatientRecord.model_validate_json`` (a quarter of a step's work) that
    changes no result.

    A record is used only while the table still holds those bytes (another
    worker's changelog restore, or any other writer, makes it a miss). A step
    takes a record out before modifying it, so a step that raises half-way
    leaves nothing behind, and puts back what it saved.

    The records kept cost at most ``capacity_bytes`` (each counted as
    CACHED_BYTES_PER_VALUE_BYTE times its table value). A worker's patients
    recur in cycles (each device syncs now and then; a backfill replays the
    programme in event-time order), and with more patients than fit, evicting
    the least recently used drops every record just before its patient comes
    back: no hits at all. So a full cache admits a record that was not taken
    from it only with probability ADMISSION, making room by evicting records
    chosen at random: patients in a cycle then hit about as often as the share
    of them that fits (e.g. 0.72 with 73% fitting, against 0.51 admitting every
    record and 0 with least-recently-used eviction), and a record that is no
    longer used (its patient moved to another worker) still leaves in time."""

    def __init__(self, capacity_bytes: int, seed: int = 0) -> None:
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._entries: dict[str, tuple[bytes, PatientRecord, int]] = {}  # raw, record, slot
        self._keys: list[str] = []  # the keys, for a random choice (slot: a key's place)
        self._taken: set[str] = set()  # hits not put back yet: they are re-admitted
        self._random = random.Random(seed)
        self.hits = 0
        self.misses = 0  # stored values parsed (a patient without one is neither)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self._entries

    def keys(self) -> list[str]:
        """The patients whose records are kept."""
        return list(self._entries)

    def take(self, patient_id: str, raw: bytes | None) -> PatientRecord | None:
        """The record of ``raw`` (the patient's table value), removed from the cache."""
        entry = self._remove(patient_id)
        if entry is not None and entry[0] == raw:
            self.hits += 1
            self._taken.add(patient_id)
            return entry[1]
        self._taken.discard(patient_id)  # one handed out before and never put back
        if raw:
            self.misses += 1
        return _parse_state(raw)

    def put(self, patient_id: str, raw: bytes, record: PatientRecord) -> None:
        """Keep ``record``, whose table value is now ``raw`` (not to be modified after)."""
        self._remove(patient_id)
        returning = patient_id in self._taken
        self._taken.discard(patient_id)
        cost = CACHED_BYTES_PER_VALUE_BYTE * len(raw)
        if cost > self.capacity_bytes:
            return
        full = self.bytes + cost > self.capacity_bytes
        if full and not returning and self._random.random() >= ADMISSION:
            return
        keys = self._keys
        while self.bytes + cost > self.capacity_bytes:
            self._remove(keys[self._random.randrange(len(keys))])
        self._entries[patient_id] = (raw, record, len(keys))
        keys.append(patient_id)
        self.bytes += cost

    def _remove(self, patient_id: str) -> tuple[bytes, PatientRecord, int] | None:
        entry = self._entries.pop(patient_id, None)
        if entry is None:
            return None
        self.bytes -= CACHED_BYTES_PER_VALUE_BYTE * len(entry[0])
        last = self._keys.pop()
        if last != patient_id:  # the last key takes the removed one's slot
            slot = entry[2]
            self._keys[slot] = last
            raw, record, _ = self._entries[last]
            self._entries[last] = (raw, record, slot)
        return entry


def process_batch(
    states: Mapping[str, bytes | None],
    events: Sequence[RawRecord],
    context: StepContext,
    now: datetime | None = None,
    times: dict[str, float] | None = None,
    cache: RecordCache | None = None,
    clock: Callable[[], float] = time.process_time,
) -> tuple[dict[str, bytes], StepOutputs]:
    """Apply a batch of raw records to their patients' states.

    ``states``: the table value (PatientRecord JSON) of every key of
    ``batch_keys(events)``, None for a patient without one. Returns the new
    value of every patient the batch changed (each written once) and the
    outputs. Each record is validated (streams.validation; a bad one is
    dead-lettered with its original bytes and origin), de-duplicated and applied
    (streams.patient_state.apply_event); each patient whose statistics changed is
    scored once under the current posteriors and the score published (so the
    latest score of a patient always counts all its readings). A patient whose
    event was a replay (a worker stopped between applying events and committing
    their offsets) has its evidence and score sent again: both are idempotent,
    and either may have been lost.
    An event whose application raises is dead-lettered as ``processing_error``
    and the patient continues from its state before that event.
    ``times``: when given, the seconds of each stage (STAGES) by ``clock`` are
    added to it: the process's CPU by default (benchmarks/patients_path.py:
    the device's threads count), the calling thread's for the worker's metric
    (``time.thread_time``: what the event loop can do). ``cache``: parsed
    records of earlier steps (RecordCache; the same results, without parsing
    unchanged table values).
    """
    lap = _Laps(times, clock)
    now = now or datetime.now(UTC)
    outputs = StepOutputs()
    valid = _validate(events, context, now, outputs)
    lap("parse")
    cache = cache if cache is not None else RecordCache(0)
    records, broken = _load(states, valid, cache)
    lap("load")
    applied, touched, replayed = _apply(states, records, broken, valid, context, outputs)
    _start_residuals(context, outputs)
    lap("apply")
    # new evidence always republishes: the score's counts and last event changed
    to_score = [records[p] for p in applied if touched[p] or p in replayed]
    try:  # the summaries compute on the device while the evidence is built
        summaries = _start_summaries(_by_measure(to_score, context), context)
    except Exception:  # _score tries again, and logs
        summaries = {}
    lap("score")
    forwards = {p: measures for p, measures in touched.items() if measures}
    for patient_id in replayed:
        if patient_id not in forwards:  # a replayed patient's evidence, every measure
            forwards[patient_id] = set(records[patient_id].measures)
    _evidence(((records[p], measures) for p, measures in forwards.items()), context, outputs)
    lap("evidence")
    try:
        _score(to_score, context, outputs, {r.patient_id for r in to_score}, summaries)
    except Exception:  # the evidence is saved and forwarded all the same
        log_failure("scoring a batch of %d patients failed", len(to_score))
    lap("score")
    saves = {p: json_bytes(records[p]) for p in applied}
    _keep(cache, states, records, saves)
    lap("save")
    return saves, outputs


STAGES = ("parse", "load", "apply", "score", "evidence", "save")


class _Laps:
    """Adds the ``clock`` seconds since the previous lap to ``times[stage]``
    (the stage profile); does nothing without ``times``."""

    def __init__(self, times: dict[str, float] | None, clock: Callable[[], float]) -> None:
        self.times = times
        self.clock = clock
        self.last = clock() if times is not None else 0.0

    def __call__(self, stage: str) -> None:
        if self.times is not None:
            now = self.clock()
            self.times[stage] = self.times.get(stage, 0.0) + now - self.last
            self.last = now


Validated = tuple[RawRecord, str, Origin, Observation | EnrollmentRecord]


def _validate(
    events: Sequence[RawRecord], context: StepContext, now: datetime, outputs: StepOutputs
) -> list[Validated]:
    """The valid records of a batch as (record, source, origin, event); the
    others are dead-lettered (streams.validation), or re-routed when they are on
    another partition than their key's (streams.partitioning)."""
    valid = []
    partitions = context.settings.partitions
    for event in events:
        source = context.settings.source_of(event.topic)
        if event.key and (right := key_partition(event.key, partitions)) != event.partition:
            # A producer whose partitioner is not Kafka's murmur2 (librdkafka's
            # default): the key's partition belongs to the worker that owns the
            # patient, possibly another one.
            outputs.reroutes.append((event.topic, Message(event.key, event.value, right)))
            outputs.rerouted[source] += 1
            continue
        # Built without validation: the consumer's own types (half the cost of Origin()).
        timestamp = None if event.timestamp is None else float(event.timestamp)
        origin = trusted(Origin, topic=event.topic, partition=int(event.partition),
                         offset=int(event.offset), timestamp=timestamp)  # fmt: skip
        try:
            parsed = validate_record(
                source, event.key, event.value, origin, context.catalogue, context.settings, now
            )
        except Rejected as rejected:
            log.debug("rejected %s:%s: %s", event.topic, event.offset, rejected)
            _reject(outputs, event, source, rejected.reason, rejected.detail, origin)
            continue
        outputs.accepted[source] += 1
        valid.append((event, source, origin, parsed))
    return valid


def _load(
    states: Mapping[str, bytes | None], valid: list[Validated], cache: RecordCache
) -> tuple[dict[str, PatientRecord | None], dict[str, str]]:
    """The records of the patients with valid events (None: no state yet), and
    the patients whose stored state cannot be read, with the error."""
    records: dict[str, PatientRecord | None] = {}
    broken: dict[str, str] = {}
    for _, _, _, parsed in valid:
        patient_id = parsed.patient_id
        if patient_id in records or patient_id in broken:
            continue
        try:
            records[patient_id] = cache.take(patient_id, states.get(patient_id))
        except Exception as error:  # a bug must not stop the stream
            log_failure("could not read a patient's stored state")
            broken[patient_id] = f"{type(error).__name__}: {error}"
    return records, broken


def _parse_state(raw: bytes | None) -> PatientRecord | None:
    return PatientRecord.model_validate_json(raw) if raw else None


def _keep(
    cache: RecordCache,
    states: Mapping[str, bytes | None],
    records: Mapping[str, PatientRecord | None],
    saves: Mapping[str, bytes],
) -> None:
    """Put the step's records back in the cache with their table values: the
    saved ones with their new value, the others (loaded, nothing applied, so
    unmodified) with the value they were read from."""
    if not cache.capacity_bytes:
        return
    for patient_id, record in records.items():
        raw = saves.get(patient_id) or states.get(patient_id)
        if record is not None and raw:
            cache.put(patient_id, raw, record)


def _apply(
    states: Mapping[str, bytes | None],
    records: dict[str, PatientRecord | None],
    broken: dict[str, str],
    valid: list[Validated],
    context: StepContext,
    outputs: StepOutputs,
) -> tuple[dict[str, None], dict[str, set[str]], dict[str, None]]:
    """Apply the valid events in order to ``records`` (updated in place).
    Returns the patients with an event applied (an ordered set), the measures
    whose evidence changed per patient, and the patients with a replayed event.

    Every event modifies its patient's record in place (a copy per event cost
    a third of apply_event). An event whose application raises leaves the
    record as it was before that event all the same: the record is rebuilt
    from its stored state and the batch's events applied to it before
    (``_reapply``; apply_event is a function of the record and the event).

    A run of one enrolled patient's consecutive readings is applied together
    (apply_observations: the same record as one at a time, in a fraction of
    the time; a backlog's take is grouped by patient).

    The readings the prior-data conflict check gets (``outputs.readings``) are
    those of every ⌈n / DriftConfig.conflict_readings_per_step⌉-th of the n
    events (a run's first reading for the run that holds it): all of a live
    worker's small steps (their readings one at a time), an evenly spaced
    sample of a backlog's (a residual costs about what a patient's score does)."""
    applied: dict[str, None] = {}
    touched: dict[str, set[str]] = defaultdict(set)
    replayed: dict[str, None] = {}
    history: dict[str, list[Observation | EnrollmentRecord]] = defaultdict(list)
    models = context.models
    source_of = context.settings.source_of
    # The prior-data conflict check's sample: every stride-th event of the step.
    stride = -(-len(valid) // context.settings.drift.conflict_readings_per_step) or 1

    def one(index: int) -> None:
        """Apply valid[index] by apply_event."""
        event, source, origin, parsed = valid[index]
        patient_id = parsed.patient_id
        before = records[patient_id]
        try:
            reading = _pending(before, parsed, context) if index % stride == 0 else None
            record, outcome = apply_event(before, parsed, models, copy=False)
        except Exception as error:  # a bug must not stop the stream or lose the event
            log_failure(
                "could not apply the event from %s:%d:%d", origin.topic, origin.partition,
                origin.offset,
            )  # fmt: skip
            detail = f"{type(error).__name__}: {error}"
            _reject(outputs, event, source, "processing_error", detail, origin)
            records[patient_id] = _reapply(states.get(patient_id), history[patient_id], models)
            return
        history[patient_id].append(parsed)
        applied[patient_id] = None
        records[patient_id] = record
        if reading is not None and parsed.measure in outcome.touched:
            outputs.readings[parsed.measure].append(reading)
        touched[patient_id] |= outcome.touched
        if outcome.cohort_changed:
            touched[patient_id] |= set(record.measures)
        if (outcome.touched or outcome.cohort_changed) and origin.timestamp is not None:
            outputs.arrival.setdefault(patient_id, origin.timestamp)
        for rejected_event, reason, detail in outcome.rejected:
            at = rejected_event.origin
            _reject(outputs, event, source_of(at.topic), reason, detail, at)
        outputs.replays += outcome.replays
        if outcome.replays:
            replayed[patient_id] = None

    def run(start: int, end: int) -> bool:
        """Apply valid[start:end], readings of one enrolled patient, by
        apply_observations: the same as ``one`` of each in turn. False when
        that raised: the record is back as it was before them."""
        patient_id = valid[start][3].patient_id
        record = records[patient_id]
        observations = [parsed for _, _, _, parsed in valid[start:end]]
        sampled = -(-start // stride) * stride < end  # a multiple of the stride among them
        try:
            first = observations[0]
            reading = _pending(record, first, context) if sampled else None
            outcome, done = apply_observations(record, observations, models)
        except Exception:  # each event again on its own, to dead-letter the one that fails
            records[patient_id] = _reapply(states.get(patient_id), history[patient_id], models)
            return False
        history[patient_id].extend(observations)
        applied[patient_id] = None
        if reading is not None and done[0]:
            outputs.readings[first.measure].append(reading)
        touched[patient_id] |= outcome.touched
        arrival = next(
            (o.origin.timestamp for o, ok in zip(observations, done, strict=True)
             if ok and o.origin.timestamp is not None),
            None,
        )  # fmt: skip
        if arrival is not None:
            outputs.arrival.setdefault(patient_id, arrival)
        if outcome.rejected:
            raw = {id(parsed): event for event, _, _, parsed in valid[start:end]}
            for rejected_event, reason, detail in outcome.rejected:
                at = rejected_event.origin
                _reject(outputs, raw[id(rejected_event)], source_of(at.topic), reason, detail, at)
        outputs.replays += outcome.replays
        if outcome.replays:
            replayed[patient_id] = None
        return True

    index, count = 0, len(valid)
    while index < count:
        parsed = valid[index][3]
        patient_id = parsed.patient_id
        end = index + 1
        if stride > 1 and isinstance(parsed, Observation):  # the patient's next readings
            while (
                end < count
                and isinstance(valid[end][3], Observation)
                and valid[end][3].patient_id == patient_id
            ):
                end += 1
        if patient_id in broken:
            for event, source, origin, _ in valid[index:end]:
                _reject(outputs, event, source, "processing_error", broken[patient_id], origin)
        elif not (
            end - index > 1
            and (record := records[patient_id]) is not None
            and record.enrolled
            and run(index, end)
        ):
            for at in range(index, end):
                one(at)
        index = end
    return applied, touched, replayed


def _reapply(
    state: bytes | None,
    events: list[Observation | EnrollmentRecord],
    models: dict[str, ModelConfig],
) -> PatientRecord | None:
    """The record of ``state`` with ``events`` applied in order: a patient's
    record as it was before the event of the batch that failed (each of
    ``events`` was applied once already, to the same record, without error)."""
    record = _parse_state(state)
    for event in events:
        record, _ = apply_event(record, event, models, copy=False)
    return record


def rescore(
    states: Mapping[str, bytes | None],
    measure: str,
    context: StepContext,
    force: bool = False,
    cache: RecordCache | None = None,
) -> tuple[dict[str, bytes], StepOutputs]:
    """After a new population posterior: score every patient of ``states`` with
    evidence on ``measure`` and keep (write and send) the scores that changed
    materially, or every score when ``force`` (the posterior itself moved
    materially). ``cache`` as for process_batch.

    A patient whose last published score of ``measure`` is already under this
    posterior's version is left alone, forced or not: every reading since was
    scored (and published) under it. That is what makes a restart cheap: the
    worker is handed the last posterior again and would otherwise rescore, and
    with ``force`` republish, every patient it holds."""
    version = context.posteriors.version(measure)

    def behind(r: PatientRecord) -> bool:
        return measure in r.measures and not (
            measure in r.published and r.published[measure].population_version == version
        )

    return _rescore_where(states, behind, context, force, cache)


def rescore_joint(
    states: Mapping[str, bytes | None],
    group: str,
    context: StepContext,
    force: bool = False,
    cache: RecordCache | None = None,
) -> tuple[dict[str, bytes], StepOutputs]:
    """After a new posterior of joint group ``group``: as ``rescore``, for every
    patient of ``states`` with evidence of one of the group's measures whose
    last published joint score of the group is under an older version. The
    patient's whole score is published (its measures' scores and every joint
    group's) when the group's score changed materially, or when ``force``."""
    message = context.posteriors.joint.get(group)

    def behind(r: PatientRecord) -> bool:
        return (
            message is not None
            and any(m in r.measures for m in message.measures)
            and not (
                group in r.published_joint
                and r.published_joint[group].population_version == message.version
            )
        )

    return _rescore_where(states, behind, context, force, cache)


def _rescore_where(
    states: Mapping[str, bytes | None],
    behind: Callable[[PatientRecord], bool],
    context: StepContext,
    force: bool,
    cache: RecordCache | None,
) -> tuple[dict[str, bytes], StepOutputs]:
    """Score the patients of ``states`` for which ``behind`` holds and keep what
    changed materially (everything when ``force``): rescore's and rescore_joint's
    common body."""
    cache = cache if cache is not None else RecordCache(0)
    loaded = {patient_id: cache.take(patient_id, raw) for patient_id, raw in states.items()}
    records = [r for r in loaded.values() if r is not None and behind(r)]
    outputs = StepOutputs()
    forced = {r.patient_id for r in records} if force else ()
    published = _score(records, context, outputs, forced=forced)
    saves = {r.patient_id: json_bytes(r) for r in published}
    _keep(cache, states, loaded, saves)
    return saves, outputs


def _reject(
    outputs: StepOutputs,
    event: RawRecord,
    source: str,
    reason: str,
    detail: str,
    origin: Origin,
) -> None:
    """Dead-letter the raw record ``event`` (original key and bytes) with the
    reason and where the rejected event was read."""
    letter = dead_letter(
        reason, detail, origin.topic, origin.partition, origin.offset, event.key, event.value
    )
    outputs.dead_letters.append(Message(event.key, json_bytes(letter)))
    outputs.rejected[(source, reason)] += 1


def _pending(record: PatientRecord | None, event, context: StepContext) -> PendingReading | None:
    """The reading ``event`` with its patient's evidence before it, when a
    prior-data conflict check applies (an enrolled patient, a posterior, a
    reading not older than the patient's latest, a Gaussian measure: the check's
    standardised residual has no meaning for a 0/1 value or a count)."""
    if not isinstance(event, Observation) or record is None or not record.enrolled:
        return None
    if event.measure not in context.posteriors:
        return None
    if context.models[event.measure].family != "gaussian":
        return None  # the predictive residual is Gaussian: no check of binary or count readings
    try:
        return pending_reading(record, event, origin_key(event.origin))
    except Exception:  # monitoring must never dead-letter a valid reading
        log_failure("could not prepare a reading's predictive check")
        return None


def _start_residuals(context: StepContext, outputs: StepOutputs) -> None:
    """Dispatch the prior-data conflict check's residuals of the step's
    readings (streams.scoring.dispatch_reading_residuals): the device computes
    them while the step scores and saves."""
    for measure, readings in outputs.readings.items():
        try:
            outputs.residuals[measure] = dispatch_reading_residuals(
                context.posteriors[measure], readings, context.models[measure]
            )
        except Exception:  # monitoring must never dead-letter or drop a valid reading
            log_failure("could not start the predictive check of %d readings", len(readings))


def _evidence(
    changes: Iterable[tuple[PatientRecord, set[str]]], context: StepContext, outputs: StepOutputs
) -> None:
    """The whole statistics of each (patient, changed measures) for the
    population agent: per measure, EvidenceBatch messages of up to EVIDENCE_CHUNK
    patients, on the measure's evidence partition (one owner per measure, and
    per joint group: streams.partitioning.EvidencePartitions)."""
    by_measure: dict[str, list[PatientRecord]] = defaultdict(list)
    for record, measures in changes:
        for measure in measures:
            by_measure[measure].append(record)
    partition_of = context.evidence_partitions
    for measure, records in by_measure.items():
        items = evidence_fields(records, measure, context.models[measure])
        for start in range(0, len(items), EVIDENCE_CHUNK):
            batch = evidence_batch_json(measure, items[start : start + EVIDENCE_CHUNK])
            outputs.evidence.append(Message(measure.encode(), batch, partition_of(measure)))


def _by_measure(
    records: list[PatientRecord], context: StepContext
) -> dict[str, list[PatientRecord]]:
    """The enrolled records with evidence of each measure that has a posterior."""
    by_measure: dict[str, list[PatientRecord]] = defaultdict(list)
    for record in records:
        if record.cohort is None:
            continue
        for measure in record.measures:
            if measure in context.posteriors:
                by_measure[measure].append(record)
    return by_measure


def _start_summaries(
    by_measure: dict[str, list[PatientRecord]], context: StepContext
) -> dict[str, Callable[[], EffectSummary]]:
    """Each measure's mixture summaries of its records, dispatched to the
    device (streams.scoring.dispatch_patients): calling one waits for it."""
    return {
        measure: dispatch_patients(
            *_patients_of(measure, group, context), [r.groups for r in group]
        )
        for measure, group in by_measure.items()
    }


def _patients_of(measure: str, group: list[PatientRecord], context: StepContext) -> tuple:
    """What streams.scoring's summaries and scores take of ``group``'s patients
    of ``measure``: its posterior, their statistics, cohorts and covariates,
    its spec and model."""
    return (
        context.posteriors[measure],
        [r.measures[measure] for r in group],
        [r.cohort for r in group],
        [r.covariates for r in group],
        context.catalogue.get(measure),
        context.models[measure],
    )


def _score(
    records: list[PatientRecord],
    context: StepContext,
    outputs: StepOutputs,
    forced: Collection[str] = (),
    summaries: Mapping[str, Callable[[], EffectSummary]] | None = None,
) -> list[PatientRecord]:
    """Score ``records`` (every measure with a posterior) under the current
    posteriors; for those whose score changed materially (or whose id is in
    ``forced``) record the new score in the record (``published``,
    ``published_score_json``, modified in place) and add the score message and its
    responder transitions to ``outputs``. Returns the records so changed.
    ``summaries``: measures' summaries of these records already dispatched
    (``_start_summaries``)."""
    by_measure = _by_measure(records, context)
    if not summaries:
        summaries = _start_summaries(by_measure, context)
    new_scores: dict[str, dict[str, ScoreRow]] = defaultdict(dict)
    for measure, group in by_measure.items():
        scores = measure_score_rows(
            *_patients_of(measure, group, context),
            context.rule,
            pathways=context.settings.pathways,
            previous=[
                r.published[measure].classification if measure in r.published else None
                for r in group
            ],
            groups=[r.groups for r in group],
            summary=summaries[measure](),
        )
        for record, score in zip(group, scores, strict=True):
            new_scores[record.patient_id][measure] = score
    joint = joint_stream.patients_joint_scores(
        records,
        context.posteriors.joint,
        context.joint,
        context.catalogue,
        context.rule,
        context.settings.pathways,
    )
    by_id = {r.patient_id: r for r in records}
    weights = context.weights
    changed = []
    for patient_id in [*new_scores, *(p for p in joint if p not in new_scores)]:
        record, scores, groups = (
            by_id[patient_id],
            new_scores.get(patient_id, {}),
            joint.get(patient_id, {}),
        )
        material = (
            patient_id in forced
            or any(changed_materially(record.published.get(m), s) for m, s in scores.items())
            or any(
                joint_stream.changed_materially(record.published_joint.get(g), s)
                for g, s in groups.items()
            )
        )
        if not material:
            continue
        for group, score in groups.items():
            record.published_joint[group] = joint_stream.published_of(score)
        for measure, score in scores.items():
            previous = record.published.get(measure)
            if previous is not None and previous.classification != score.classification:
                alert = transition_alert(record.patient_id, previous.classification, score)
                if alert is not None:
                    outputs.alerts.append(Message(patient_id.encode(), json_bytes(alert)))
            record.published[measure] = published_of(score)
            outputs.calls[measure][patient_id] = score.classification
        message = efficacy_score_json(
            record, list(scores.values()), weights, context.rule, list(groups.values())
        )
        record.published_score_json = message
        outputs.scores.append(Message(patient_id.encode(), message))
        changed.append(record)
    return changed


def transition_alert(patient_id: str, previous: str, score: ScoreRow) -> Alert | None:
    """The alert for a patient's call moving to responder or non-responder (None
    for a move to uncertain). Its event id is stable across a replay."""
    if score.classification not in ("responder", "non_responder"):
        return None
    return Alert(
        event_id=bounded_event_id(
            "transition",
            f"{patient_id}:{score.measure}:{score.population_version}:"
            f"{score.count_exposed + score.count_unexposed}",
        ),
        event_time=score.last_event_time or datetime.now(UTC),
        kind="transition",
        severity="warning" if score.classification == "non_responder" else "info",
        patient_id=patient_id,
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
