"""A patient's durable state and the pure step that applies one event to it.

    record, outcome = apply_event(record, event, models)

``record`` is what the patients table stores (JSON): enrolment and cohort, the
exposure timeline, the sufficient statistics of every measure (model.evidence,
standardised units), the identities of the events already applied, observations
held until enrolment, and what was last published.

Idempotency does not rest on Kafka transactions. Every applied event is
remembered by ``event_id`` with the coordinates of the raw record it came from
(topic, partition, offset):

- the same event id from the same origin is a *replay* (a worker restarted
  before committing its offsets, or the consumer group was reset): ignored;
- the same event id from another origin is a *duplicate* sent by a producer:
  dead-lettered with reason ``duplicate``, never counted twice.

Exposure at an observation is read off the patient's timeline at the
observation's event time (enrolment sets the initial exposure; ExposureChange
events start, stop or change the dose). Observations that arrive before the
patient's enrolment are held (up to ``MAX_PENDING``) and applied when the
enrolment arrives; beyond that they are dead-lettered as ``not_enrolled``.
Exposure changes must reach the pipeline before the readings they govern.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from model.config import ModelConfig
from model.evidence import PatientStats, add_events, empty_stats
from streams.schemas import Enrollment, EnrollmentRecord, ExposureChange, Observation, Origin

MAX_PENDING = 1000
SECONDS_PER_DAY = 86400.0


def days(moment: datetime) -> float:
    """Event time as days since the Unix epoch: the model's raw time unit."""
    return moment.timestamp() / SECONDS_PER_DAY


def origin_key(origin: Origin) -> str:
    return f"{origin.topic}:{origin.partition}:{origin.offset}"


class MeasureStats(BaseModel):
    """One measure's sufficient statistics of one patient (model.evidence.PatientStats
    of a single patient, as JSON)."""

    model_config = ConfigDict(extra="forbid")

    gram: list[list[float]]
    reference_time: float
    count_exposed: int = 0
    count_unexposed: int = 0
    last_event_time: datetime | None = None

    def as_stats(self) -> PatientStats:
        return PatientStats(
            gram=np.asarray(self.gram, dtype=float)[None],
            reference_time=np.asarray([self.reference_time], dtype=float),
            count_exposed=np.asarray([self.count_exposed]),
            count_unexposed=np.asarray([self.count_unexposed]),
        )

    @classmethod
    def from_stats(cls, stats: PatientStats, last_event_time: datetime | None) -> MeasureStats:
        return cls(
            gram=stats.gram[0].tolist(),
            reference_time=float(stats.reference_time[0]),
            count_exposed=int(stats.count_exposed[0]),
            count_unexposed=int(stats.count_unexposed[0]),
            last_event_time=last_event_time,
        )


class Published(BaseModel):
    """What was last published for a measure: the material-change test compares
    a new score with it."""

    model_config = ConfigDict(extra="forbid")

    population_version: int
    mean: float
    sd: float
    p_benefit_ge_mcid: float
    classification: str


class PatientRecord(BaseModel):
    """The value of the patients table (keyed by patient id)."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str
    cohort: str | None = None
    arm: str | None = None
    enrolled_at: datetime | None = None
    timeline: list[tuple[float, float]] = Field(default_factory=list)
    seen: dict[str, str] = Field(default_factory=dict)
    pending: list[Observation] = Field(default_factory=list)
    measures: dict[str, MeasureStats] = Field(default_factory=dict)
    published: dict[str, Published] = Field(default_factory=dict)

    @property
    def enrolled(self) -> bool:
        return self.cohort is not None

    def exposure_at(self, time_days: float) -> float:
        """Exposure in force at ``time_days``: the latest timeline entry at or
        before it (0 before the first entry)."""
        index = bisect.bisect_right(self.timeline, (time_days, float("inf"))) - 1
        return self.timeline[index][1] if index >= 0 else 0.0


@dataclass
class Outcome:
    """What applying an event did. ``touched``: measures whose statistics changed;
    ``rejected``: (event, reason, detail) to dead-letter; ``replays``: ignored
    re-deliveries; ``cohort_changed``: the patient's cohort was set or changed."""

    touched: set[str] = field(default_factory=set)
    rejected: list[tuple[Observation | EnrollmentRecord, str, str]] = field(default_factory=list)
    replays: int = 0
    held: int = 0
    cohort_changed: bool = False


def _seen_before(
    record: PatientRecord, event_id: str, origin: Origin, outcome: Outcome, event
) -> bool:
    """True when the event must not be applied (replay or duplicate); records it."""
    previous = record.seen.get(event_id)
    if previous is None:
        return False
    if previous == origin_key(origin):
        outcome.replays += 1
    else:
        outcome.rejected.append(
            (event, "duplicate", f"event_id {event_id!r} was already applied from {previous}")
        )
    return True


def _add_observation(
    record: PatientRecord, observation: Observation, model: ModelConfig, outcome: Outcome
) -> None:
    time = days(observation.event_time)
    current = record.measures.get(observation.measure)
    stats = current.as_stats() if current else empty_stats(1, model)
    stats = add_events(
        stats,
        np.zeros(1, dtype=np.int64),
        np.asarray([record.exposure_at(time)]),
        np.asarray([time]),
        np.asarray([observation.value]),
        model,
    )
    last = observation.event_time
    if current and current.last_event_time and current.last_event_time > last:
        last = current.last_event_time
    record.measures[observation.measure] = MeasureStats.from_stats(stats, last)
    record.seen[observation.event_id] = origin_key(observation.origin)
    outcome.touched.add(observation.measure)


def apply_event(
    record: PatientRecord | None,
    event: Observation | EnrollmentRecord,
    models: dict[str, ModelConfig],
) -> tuple[PatientRecord, Outcome]:
    """Apply one event to a patient's record (a copy; the input is not modified).

    ``models``: the ModelConfig of every measure in the catalogue (observations
    were validated against it by ingest, so the measure is known).
    """
    record = (
        record.model_copy(deep=True)
        if record is not None
        else PatientRecord(patient_id=event.patient_id)
    )
    outcome = Outcome()
    if isinstance(event, Observation):
        if _seen_before(record, event.event_id, event.origin, outcome, event):
            return record, outcome
        if not record.enrolled:
            if any(p.event_id == event.event_id for p in record.pending):
                outcome.replays += 1
            elif len(record.pending) >= MAX_PENDING:
                outcome.rejected.append(
                    (event, "not_enrolled", f"no enrolment yet and {MAX_PENDING} readings held")
                )
            else:
                record.pending.append(event)
                outcome.held += 1
            return record, outcome
        _add_observation(record, event, models[event.measure], outcome)
        return record, outcome

    inner = event.event
    if _seen_before(record, inner.event_id, event.origin, outcome, event):
        return record, outcome
    record.seen[inner.event_id] = origin_key(event.origin)
    time = days(inner.event_time)
    if isinstance(inner, Enrollment):
        outcome.cohort_changed = record.cohort != inner.cohort
        record.cohort, record.arm, record.enrolled_at = inner.cohort, inner.arm, inner.event_time
        bisect.insort(record.timeline, (time, 1.0 if inner.exposed else 0.0))
        pending, record.pending = record.pending, []
        for observation in sorted(pending, key=lambda o: o.event_time):
            _add_observation(record, observation, models[observation.measure], outcome)
    elif isinstance(inner, ExposureChange):
        bisect.insort(record.timeline, (time, inner.exposure))
    return record, outcome
