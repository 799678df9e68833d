"""A patient's durable state and the pure step that applies one event to it.

    record, outcome = apply_event(record, event, models)

``record`` is what the patients table stores (JSON): enrolment and cohort, the
exposure timeline, the sufficient statistics of every measure (model.evidence,
standardised units), the identities of the events already applied, observations
held until enrolment, and what was last published (the latest score message
itself too).

Idempotency does not rest on Kafka transactions. The latest ``SEEN_KEEP``
applied events are remembered by a 64-bit digest of their ``event_id`` with the
coordinates of the raw record each came from (topic, partition, offset), packed
in fixed-width entries (``PatientRecord.seen_index``: ~24 bytes of JSON an event
where the event id and origin as text took ~45, and one object instead of two
per event):

- the same event id from the same origin is a *replay* (a worker restarted
  before committing its offsets): ignored;
- the same event id from another origin is a *duplicate* sent by a producer:
  dead-lettered with reason ``duplicate``, never counted twice.

An event id forgotten to keep the state bounded leaves its offset behind: per
topic partition, the highest offset of a forgotten event (``forgotten``). Kafka
delivers a partition in order, so a record at or below it was read before (a
consumer group reset to old offsets, a backfill into a worker with state) and
is a replay too, however old. What is lost is only the recognition of a
producer duplicate sent after ``SEEN_KEEP`` newer events of the same patient.
(Two different event ids of one patient with the same digest, odds about
SEEN_KEEP/2^64 per event, would have the newer one taken for the older.)

Exposure at an observation is read off the patient's timeline at the
observation's event time (enrolment sets the initial exposure; ExposureChange
events start, stop or change the dose). Kafka orders nothing across topics, so
an exposure change may arrive after readings it governs: each measure keeps the
raw (time, value) of its recent readings (with the reading's adherence and
time-varying covariates when it has them: ``Reading``) and re-derives their
exposure when the timeline changes. A reading's exposure is the timeline's dose
times its adherence. Once more than 2·``RECENT_KEEP`` are held, the readings
older than the ``RECENT_KEEP``-th newest *or* more than ``REORDER_WINDOW_DAYS``
before the latest are sealed into statistics (state stays bounded however dense
the readings: the window is the shorter of the two). An exposure
change older than sealed evidence is dead-lettered as ``late_exposure_change``.
The statistics therefore equal the batch computation over the unique events in
any arrival order within the window. Observations that arrive before the
patient's enrolment are held (up to ``MAX_PENDING``) and applied when the
enrolment arrives; beyond that they are dead-lettered as ``not_enrolled``.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from model.config import ModelConfig
from model.covariates import reading_design
from model.evidence import (
    PatientStats,
    add_events,
    add_reading,
    add_vectors,
    decay_to,
    empty_packed,
    empty_stats,
    gram_stats,
    merge_stats,
    packed,
    reading_vectors,
    stacked,
    stats_from_events,
)
from model.families import add_cell_reading, family_stats_from_events
from streams.schemas import (
    SCHEMA_VERSION,
    Enrollment,
    EnrollmentRecord,
    ExposureChange,
    Observation,
    Origin,
    PatientEvidence,
    trusted,
)

MAX_PENDING = 1000
SEEN_KEEP = 256  # event ids per patient remembered for duplicate detection
RECENT_KEEP = 64  # readings per measure always kept raw (at least)
REORDER_WINDOW_DAYS = 14.0  # exposure changes may arrive this late
SECONDS_PER_DAY = 86400.0


def days(moment: datetime) -> float:
    """Event time as days since the Unix epoch: the model's raw time unit."""
    return moment.timestamp() / SECONDS_PER_DAY


def origin_key(origin: Origin) -> str:
    return f"{origin.topic}:{origin.partition}:{origin.offset}"


def _packed_from_lists(value: object) -> object:
    """Statistics written as nested lists of numbers (by earlier versions, or
    given so by a caller) as ``packed`` bytes; anything else is left to the
    bytes validator (base64 in JSON)."""
    if isinstance(value, list):
        return packed(np.asarray(value, dtype=float))
    return value


#: One patient's statistics of one measure: a Gram matrix (d×d), or the cell
#: statistics of a Bernoulli or Poisson measure (model.families.CELLS), as
#: ``model.evidence.packed`` bytes (float64, little-endian, row-major; URL-safe
#: base64 in JSON). Kept packed in memory too: one object of contiguous floats
#: per statistic, which the stream updates reading by reading
#: (model.evidence.add_reading) and stacks per batch (model.evidence.stacked)
#: without walking d + 1 lists of float objects. Nested lists (records written
#: before) are read.
Statistics = Annotated[bytes, BeforeValidator(_packed_from_lists)]


class Mutable(BaseModel):
    """A model this module updates field by field, on every reading: an
    assignment stores the value (as a plain object's would) instead of going
    through pydantic's ``__setattr__``, which costs twice as much and records
    the name in ``model_fields_set``. The values assigned here are computed
    with their field's type (assignment was never validated: no
    ``validate_assignment``), and nothing reads these models'
    ``model_fields_set`` (serialisation does not exclude unset fields). A name
    that is not a field is still refused, by pydantic."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.__pydantic_fields__:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)


class MeasureStats(Mutable):
    """One measure's evidence of one patient.

    ``gram``/``reference_time``/counts: the sufficient statistics of every
    reading (model.evidence.PatientStats of one patient, as JSON): what scoring
    and the population agent use. For a Bernoulli or Poisson measure ``gram``
    holds its cell statistics (model.families), and there are no window
    statistics (no recent-window forgetting: ModelConfig.recent_window is None). They are the merge of two parts:

    - *sealed*: readings older than ``sealed_until``, folded into statistics for
      good (their exposure can no longer change);
    - *recent*: the readings inside the reorder window (``Reading``), kept so
      that an exposure change arriving after the readings it governs re-derives
      their exposure exactly.
    """

    # −inf marks "no evidence yet" / "nothing sealed"; the table is internal, so
    # JSON's Infinity extension is fine here.
    model_config = ConfigDict(
        extra="forbid",
        ser_json_inf_nan="constants",
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )

    # A Gram matrix, or a Bernoulli or Poisson measure's CELLS cell statistics
    # (model.families; ModelConfig.stat_shape).
    gram: Statistics
    reference_time: float
    count_exposed: int = 0
    count_unexposed: int = 0
    last_event_time: datetime | None = None
    sealed_gram: Statistics | None = None
    sealed_reference_time: float = float("-inf")
    sealed_count_exposed: int = 0
    sealed_count_unexposed: int = 0
    sealed_until: float = float("-inf")
    recent: list[tuple[float, ...]] = Field(default_factory=list)
    # The sealed readings' statistics under the recent-window forgetting
    # (ModelConfig.recent_window), kept only when the model has one, with the
    # half-life they use. Readings sealed before ``sealed_window_missing_until``
    # are missing from them (a record from before the window existed, or one
    # whose half-life changed): recent_window_stats waits until they weigh
    # nothing.
    sealed_window_gram: Statistics | None = None
    sealed_window_reference_time: float = float("-inf")
    sealed_window_half_life: float | None = None
    sealed_window_missing_until: float = float("-inf")
    # The window statistics of every reading (the sealed window statistics plus
    # the recent readings), kept up to date reading by reading for
    # ``window_half_life`` so that the evidence sent on every batch does not
    # recompute them from the recent readings (up to 2·RECENT_KEEP a patient).
    # None: not kept (a record saved before, or another half-life).
    window_gram: Statistics | None = None
    window_reference_time: float = float("-inf")
    window_half_life: float | None = None

    def sealed_stats(self, model: ModelConfig) -> PatientStats:
        if self.sealed_gram is None:
            return empty_stats(1, model)
        return _stats(
            self.sealed_gram,
            model,
            self.sealed_reference_time,
            self.sealed_count_exposed,
            self.sealed_count_unexposed,
        )

    def keeps_window(self, window: ModelConfig) -> bool:
        """The window statistics are kept reading by reading for ``window``."""
        return self.window_gram is not None and self.window_half_life == window.half_life

    def sealed_window(self, window: ModelConfig) -> tuple[bytes, float]:
        """The sealed readings' window statistics as (gram, reference time);
        empty (zeros, −inf) unless they were kept for ``window``'s half-life."""
        if self.sealed_window_gram is None or self.sealed_window_half_life != window.half_life:
            return empty_packed(window), float("-inf")
        return self.sealed_window_gram, self.sealed_window_reference_time

    def sealed_window_stats(self, window: ModelConfig) -> PatientStats:
        """``sealed_window`` as PatientStats."""
        gram, reference = self.sealed_window(window)
        return _stats(gram, window, reference, 0, 0)

    def set_total(self, stats: PatientStats) -> None:
        self.gram = packed(stats.gram[0])
        self.reference_time = float(stats.reference_time[0])
        self.count_exposed = int(stats.count_exposed[0])
        self.count_unexposed = int(stats.count_unexposed[0])

    def set_sealed(self, stats: PatientStats, until: float) -> None:
        self.sealed_gram = packed(stats.gram[0])
        self.sealed_reference_time = float(stats.reference_time[0])
        self.sealed_count_exposed = int(stats.count_exposed[0])
        self.sealed_count_unexposed = int(stats.count_unexposed[0])
        self.sealed_until = until


#: A recent reading: (time, value), or (time, value, adherence, c_1, …, c_k)
#: when its adherence is not 1 or the model has time-varying covariates (their
#: values, natural units, in ModelConfig.time_covariates' order).
Reading = tuple[float, ...]


def reading_of(time: float, value: float, adherence: float, covariates: list[float]) -> Reading:
    if adherence == 1.0 and not covariates:
        return (time, value)
    return (time, value, adherence, *covariates)


def _adherence(reading: Reading) -> float:
    return reading[2] if len(reading) > 2 else 1.0


def _stats(
    gram: bytes, model: ModelConfig, reference_time: float, exposed: int, unexposed: int
) -> PatientStats:
    return PatientStats(
        gram=stacked([gram], model.stat_shape),
        reference_time=np.asarray([reference_time], dtype=float),
        count_exposed=np.asarray([exposed]),
        count_unexposed=np.asarray([unexposed]),
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


class PublishedJoint(BaseModel):
    """What was last published of a joint group's score (the material-change
    test compares a new one with it)."""

    model_config = ConfigDict(extra="forbid")

    population_version: int
    responsiveness_mean: float
    responsiveness_sd: float
    p_above_population: float
    #: each measure's published joint call (the decision rule's hysteresis)
    calls: dict[str, str] = Field(default_factory=dict)


#: One entry of PatientRecord.seen_index: the event id's digest (event_digest),
#: the index of its origin's "topic:partition" in seen_partitions, its offset.
SEEN_ENTRY = struct.Struct("<8sHq")


def event_digest(event_id: str) -> bytes:
    """The 64-bit BLAKE2b digest an event id is remembered by."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).digest()


class PatientRecord(Mutable):
    """The value of the patients table (keyed by patient id)."""

    model_config = ConfigDict(
        extra="forbid",
        ser_json_inf_nan="constants",
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )

    patient_id: str
    cohort: str | None = None
    arm: str | None = None
    enrolled_at: datetime | None = None
    covariates: list[float] = Field(default_factory=list)  # design row, natural units
    # The enrolment's attributes that name a grouping level of some measure
    # (level -> group); a level absent: the attribute was missing.
    groups: dict[str, str] = Field(default_factory=dict)
    timeline: list[tuple[float, float]] = Field(default_factory=list)
    # The applied events remembered (module docstring), oldest first: SEEN_ENTRY
    # entries, and the "topic:partition" each entry's origin names.
    seen_index: bytes = b""
    seen_partitions: list[str] = Field(default_factory=list)
    # Written by versions before seen_index (event id -> origin "topic:partition:
    # offset", oldest first): read into seen_index, never written.
    seen: dict[str, str] = Field(default_factory=dict, exclude=True)
    forgotten: dict[str, int] = Field(default_factory=dict)  # "topic:partition" -> offset
    pending: list[Observation] = Field(default_factory=list)
    measures: dict[str, MeasureStats] = Field(default_factory=dict)
    published: dict[str, Published] = Field(default_factory=dict)
    published_joint: dict[str, PublishedJoint] = Field(default_factory=dict)  # by group
    # The EfficacyScore last sent to the scores topic, as the exact JSON bytes
    # sent (base64 in this record: not a nested model, which this record would
    # write with NaN/inf as constants where the score has null, and not a string,
    # whose escaping cost a third of writing the record). Served over HTTP by
    # streams.score_lookup; None until the patient's first score.
    published_score_json: bytes | None = None
    # Written by earlier versions (the same JSON as a string): read into
    # published_score_json, never written.
    published_score: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _index_seen(self) -> PatientRecord:
        """Check seen_index; move a record's old ``seen`` into it, and its old
        ``published_score`` into ``published_score_json``."""
        if len(self.seen_index) % SEEN_ENTRY.size:
            raise ValueError(f"seen_index: {len(self.seen_index)} bytes, not whole entries")
        if self.seen:  # at most SEEN_KEEP entries, all kept
            legacy, self.seen = self.seen, {}
            partitions = self.seen_partitions
            where = {partition: k for k, partition in enumerate(partitions)}
            entries = []
            for event_id, origin in legacy.items():
                partition, offset = origin.rsplit(":", 1)
                k = where.setdefault(partition, len(where))
                entries.append(SEEN_ENTRY.pack(event_digest(event_id), k, int(offset)))
            partitions.extend(list(where)[len(partitions) :])
            self.seen_index += b"".join(entries)
        if self.published_score is not None:
            legacy, self.published_score = self.published_score, None
            if self.published_score_json is None:
                self.published_score_json = legacy.encode()
        return self

    def seen_origins(self) -> list[str]:
        """The origins ("topic:partition:offset") of the events remembered, oldest first."""
        partitions = self.seen_partitions
        return [
            f"{partitions[k]}:{offset}" for _, k, offset in SEEN_ENTRY.iter_unpack(self.seen_index)
        ]

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
    re-deliveries; ``cohort_changed``: the patient's cohort (or covariates, or
    groups) was set or changed."""

    touched: set[str] = field(default_factory=set)
    rejected: list[tuple[Observation | EnrollmentRecord, str, str]] = field(default_factory=list)
    replays: int = 0
    held: int = 0
    cohort_changed: bool = False


def _seen_before(
    record: PatientRecord, digest: bytes, event_id: str, origin: Origin, outcome: Outcome, event
) -> bool:
    """True when the event must not be applied (replay or duplicate); records it."""
    index = record.seen_index
    position = index.find(digest)
    while position >= 0 and position % SEEN_ENTRY.size:  # inside another entry
        position = index.find(digest, position + 1)
    if position < 0:
        forgotten = record.forgotten  # empty until SEEN_KEEP events: no key to build
        if forgotten and origin.offset <= forgotten.get(f"{origin.topic}:{origin.partition}", -1):
            outcome.replays += 1  # read again long after: its id is no longer kept
            return True
        return False
    _, k, offset = SEEN_ENTRY.unpack_from(index, position)
    previous = f"{record.seen_partitions[k]}:{offset}"
    if previous == origin_key(origin):
        outcome.replays += 1
    else:
        outcome.rejected.append(
            (event, "duplicate", f"event_id {event_id!r} was already applied from {previous}")
        )
    return True


def _remember(record: PatientRecord, digest: bytes, origin: Origin) -> None:
    """Remember an applied event by its id's digest (the module's docstring)."""
    _remember_at(record, digest, f"{origin.topic}:{origin.partition}", origin.offset)


def _remember_at(record: PatientRecord, digest: bytes, partition: str, offset: int) -> None:
    """Append an entry to the record's seen_index; beyond SEEN_KEEP, forget the
    oldest, keeping its offset (``forgotten``)."""
    partitions = record.seen_partitions
    try:
        k = partitions.index(partition)
    except ValueError:
        k = len(partitions)
        partitions.append(partition)
    index = record.seen_index + SEEN_ENTRY.pack(digest, k, offset)
    excess = len(index) // SEEN_ENTRY.size - SEEN_KEEP
    if excess > 0:
        cut = excess * SEEN_ENTRY.size
        for _, j, old in SEEN_ENTRY.iter_unpack(index[:cut]):
            if old > record.forgotten.get(partitions[j], -1):
                record.forgotten[partitions[j]] = old
        index = index[cut:]
    record.seen_index = index


def _readings_stats(
    record: PatientRecord, readings: list[Reading], model: ModelConfig
) -> PatientStats:
    """Statistics of readings with exposure from the current timeline."""
    times = np.asarray([r[0] for r in readings], dtype=float)
    if model.family != "gaussian":
        return family_stats_from_events(
            1,
            np.zeros(times.size, dtype=np.int64),
            np.asarray(_exposures(record, readings)),
            times,
            np.asarray([r[1] for r in readings], dtype=float),
            model,
        )
    return stats_from_events(
        1,
        np.zeros(times.size, dtype=np.int64),
        np.asarray(_exposures(record, readings)),
        times,
        np.asarray([r[1] for r in readings], dtype=float),
        model,
        time_covariates=reading_design([r[3:] for r in readings], model),
    )


def _rederive(record: PatientRecord, stats: MeasureStats, model: ModelConfig) -> None:
    """Total statistics = sealed + recent readings under the current timeline
    (and the same for the window statistics)."""
    stats.set_total(
        merge_stats(stats.sealed_stats(model), _readings_stats(record, stats.recent, model), model)
    )
    if model.recent_window is not None:
        _refresh_window(record, stats, model.recent_window)


def _refresh_window(record: PatientRecord, stats: MeasureStats, window: ModelConfig) -> None:
    """The window statistics of every reading from their parts: the sealed
    window statistics plus the recent readings under the current timeline."""
    total = merge_stats(
        stats.sealed_window_stats(window), _readings_stats(record, stats.recent, window), window
    )
    stats.window_gram = packed(total.gram[0])
    stats.window_reference_time = float(total.reference_time[0])
    stats.window_half_life = window.half_life


def _add_to_window(
    record: PatientRecord,
    stats: MeasureStats,
    window: ModelConfig,
    exposure: float,
    time: float,
    value: float,
    covariates: tuple[float, ...] = (),
) -> None:
    """After a reading was added to the sealed or recent part: the window
    statistics plus that reading, or all of them from their parts when they
    were not kept for this half-life."""
    if not stats.keeps_window(window):
        _refresh_window(record, stats, window)
        return
    stats.window_gram, stats.window_reference_time = add_reading(
        stats.window_gram, stats.window_reference_time, exposure, time, value, window, covariates
    )


#: Sealed readings missing from the recent-window statistics are ignored once
#: they are this many half-lives old (weight < 2^-7 < 1%).
WINDOW_COMPLETE_HALF_LIVES = 7.0


def _window_missing_until(stats: MeasureStats, window: ModelConfig) -> float:
    """Time before which sealed readings are missing from the window statistics."""
    if stats.sealed_window_half_life == window.half_life:
        return stats.sealed_window_missing_until
    # No window statistics for this half-life yet: everything sealed is missing.
    return stats.sealed_until if stats.sealed_gram is not None else float("-inf")


def _sync_window(stats: MeasureStats, window: ModelConfig) -> None:
    """Before adding to the sealed window statistics: start them afresh if they
    were kept for another half-life, or not at all (a record saved before)."""
    if stats.sealed_window_half_life == window.half_life:
        return
    stats.sealed_window_missing_until = _window_missing_until(stats, window)
    stats.sealed_window_gram = None
    stats.sealed_window_reference_time = float("-inf")
    stats.sealed_window_half_life = window.half_life


def recent_window_stats(
    record: PatientRecord, stats: MeasureStats, model: ModelConfig
) -> PatientStats | None:
    """The measure's statistics under the recent-window forgetting
    (ModelConfig.recent_window: weights 2^(-age / recent_half_life)), at the
    same reference time as the all-time statistics: exactly the batch
    computation with that half-life, like the totals. None without a window,
    and while readings missing from the sealed window statistics (see
    MeasureStats) are younger than WINDOW_COMPLETE_HALF_LIVES half-lives."""
    (window,) = recent_window_stats_many([(record, stats)], model)
    return window


def recent_window_stats_many(
    items: list[tuple[PatientRecord, MeasureStats]], model: ModelConfig
) -> list[PatientStats | None]:
    """``recent_window_stats`` of many (record, measure statistics) at once: the
    sealed window statistics plus every recent reading with its exposure
    (model.evidence.add_events, one array computation for all of them),
    re-based to each patient's all-time reference time."""
    out: list[PatientStats | None] = [None] * len(items)
    stacked, complete = _recent_windows(items, model)
    if stacked is None:
        return out
    for index, k in enumerate(complete):
        out[k] = PatientStats(
            gram=stacked.gram[index : index + 1],
            reference_time=stacked.reference_time[index : index + 1],
            count_exposed=stacked.count_exposed[index : index + 1],
            count_unexposed=stacked.count_unexposed[index : index + 1],
        )
    return out


def _recent_windows(
    items: list[tuple[PatientRecord, MeasureStats]], model: ModelConfig
) -> tuple[PatientStats | None, list[int]]:
    """The recent-window statistics (``recent_window_stats_many``) of the items
    that have them, stacked, and those items' indices; (None, []) when none has."""
    window = model.recent_window
    if window is None:
        return None, []
    complete = [
        k
        for k, (_, stats) in enumerate(items)
        if not stats.reference_time - _window_missing_until(stats, window)
        < WINDOW_COMPLETE_HALF_LIVES * window.half_life
    ]
    if not complete:
        return None, []
    grams, references, totals = [], [], []
    patient: list[int] = []
    exposure: list[float] = []
    times: list[float] = []
    values: list[float] = []
    readings: list[Reading] = []
    for index, k in enumerate(complete):
        record, stats = items[k]
        totals.append(stats.reference_time)
        if stats.keeps_window(window):
            grams.append(stats.window_gram)
            references.append(stats.window_reference_time)
            continue
        gram, reference = stats.sealed_window(window)
        grams.append(gram)
        references.append(reference)
        recent = stats.recent
        patient.extend([index] * len(recent))
        times.extend(r[0] for r in recent)
        values.extend(r[1] for r in recent)
        exposure.extend(_exposures(record, recent))
        readings.extend(recent)
    added = gram_stats(stacked(grams, window.stat_shape), np.asarray(references, dtype=float))
    if patient:
        added = add_events(
            added,
            np.asarray(patient, dtype=np.int64),
            np.asarray(exposure, dtype=float),
            np.asarray(times, dtype=float),
            np.asarray(values, dtype=float),
            window,
            reading_design([r[3:] for r in readings], window),
        )
    return decay_to(added, np.asarray(totals, dtype=float), window), complete


def _exposures(record: PatientRecord, readings: list[Reading]) -> list[float]:
    """Each reading's exposure: the dose in force at its time
    (PatientRecord.exposure_at) times its adherence."""
    timeline = record.timeline
    if not timeline:
        return [0.0] * len(readings)
    if len(timeline) == 1:
        start, level = timeline[0]
        return [level * _adherence(r) if r[0] >= start else 0.0 for r in readings]
    starts = [start for start, _ in timeline]
    levels = [0.0, *(level for _, level in timeline)]
    return [levels[bisect.bisect_right(starts, r[0])] * _adherence(r) for r in readings]


def patient_evidence(
    record: PatientRecord, measure: str, model: ModelConfig
) -> PatientEvidence | None:
    """What the population agent keeps of a patient's measure: the whole
    statistics, all-time and recent-window. None before enrolment (no cohort)
    or without readings of the measure."""
    evidence = measure_evidence([record], measure, model)
    return evidence[0] if evidence else None


def measure_evidence(
    records: list[PatientRecord], measure: str, model: ModelConfig
) -> list[PatientEvidence]:
    """``patient_evidence`` of every record that has one, in order (the
    recent-window statistics of all of them in one computation)."""
    # Built without validation: every value comes from a validated record.
    return [
        trusted(PatientEvidence, **fields) for fields in evidence_fields(records, measure, model)
    ]


def evidence_fields(
    records: list[PatientRecord], measure: str, model: ModelConfig
) -> list[dict[str, object]]:
    """The fields of ``measure_evidence``'s items, by name in PatientEvidence's
    order: what streams.schemas.evidence_batch_json writes without the models."""
    items = [
        (record, record.measures[measure])
        for record in records
        if record.cohort is not None and measure in record.measures
    ]
    # Statistics packed as bytes (streams.schemas.PatientEvidence): the
    # all-time ones as the records hold them, the window ones computed in one call.
    recent_windows, complete = _recent_windows(items, model)
    windows: list[bytes | None] = [None] * len(items)
    if recent_windows is not None:
        for k, gram in zip(complete, recent_windows.gram, strict=True):
            windows[k] = packed(gram)
    levels = model.grouping_levels
    return [
        {
            "schema_version": SCHEMA_VERSION,
            "measure": measure,
            "patient_id": record.patient_id,
            "cohort": record.cohort,
            "gram": stats.gram,
            "reference_time": stats.reference_time,
            "count_exposed": stats.count_exposed,
            "count_unexposed": stats.count_unexposed,
            "covariates": record.covariates,
            "groups": {level: record.groups[level] for level in levels if level in record.groups},
            "recent_gram": recent,
        }
        for (record, stats), recent in zip(items, windows, strict=True)
    ]


def _seal(record: PatientRecord, stats: MeasureStats, model: ModelConfig) -> None:
    """Fold readings older than the reorder window into the sealed statistics, so
    a patient's state stays bounded however long they are followed."""
    if len(stats.recent) <= 2 * RECENT_KEEP:
        return
    stats.recent.sort()
    horizon = max(stats.recent[-RECENT_KEEP][0], stats.recent[-1][0] - REORDER_WINDOW_DAYS)
    old = [r for r in stats.recent if r[0] < horizon]
    if not old:
        return
    window = model.recent_window
    if window is not None:
        _sync_window(stats, window)  # before sealed_until moves
    sealed = merge_stats(stats.sealed_stats(model), _readings_stats(record, old, model), model)
    stats.set_sealed(sealed, max(horizon, stats.sealed_until))
    if window is not None:
        sealed = merge_stats(
            stats.sealed_window_stats(window), _readings_stats(record, old, window), window
        )
        stats.sealed_window_gram = packed(sealed.gram[0])
        stats.sealed_window_reference_time = float(sealed.reference_time[0])
    stats.recent = [r for r in stats.recent if r[0] >= horizon]


def _add_reading(
    gram: Statistics,
    reference_time: float,
    exposure: float,
    time: float,
    value: float,
    model: ModelConfig,
    covariates: tuple[float, ...],
) -> tuple[Statistics, float]:
    """One patient's statistics plus one reading: model.evidence.add_reading, or
    for a Bernoulli or Poisson measure model.families.add_cell_reading (exposed
    when the exposure is not 0, as family_stats_from_events counts it)."""
    if model.family == "gaussian":
        return add_reading(gram, reference_time, exposure, time, value, model, covariates)
    return add_cell_reading(
        gram,
        reference_time,
        float(exposure != 0.0),
        time,
        value,
        model.family,
        model.half_life,
    )


def _add_observation(
    record: PatientRecord,
    observation: Observation,
    model: ModelConfig,
    outcome: Outcome,
    digest: bytes | None = None,
) -> None:
    """Apply a reading not seen before (``digest``: its event id's, when known)."""
    _add_observation_stats(record, observation, model)
    _remember(record, digest or event_digest(observation.event_id), observation.origin)
    outcome.touched.add(observation.measure)


def _add_observation_stats(
    record: PatientRecord, observation: Observation, model: ModelConfig
) -> None:
    """A reading's statistics: all-time, sealed or recent, and window."""
    time = days(observation.event_time)
    stats = record.measures.get(observation.measure)
    if stats is None:
        empty = empty_packed(model)
        stats = MeasureStats(gram=empty, reference_time=float("-inf"))
        if model.recent_window is not None:  # kept from the first reading on
            stats.window_gram, stats.window_half_life = empty, model.recent_window.half_life
        record.measures[observation.measure] = stats
    exposure = record.exposure_at(time) * observation.adherence
    covariates = tuple(observation.time_covariates)
    window = model.recent_window
    stats.gram, stats.reference_time = _add_reading(
        stats.gram, stats.reference_time, exposure, time, observation.value, model, covariates
    )
    exposed = exposure != 0
    stats.count_exposed += exposed
    stats.count_unexposed += not exposed
    if time < stats.sealed_until:  # older than the window: its exposure is final
        sealed = stats.sealed_gram or empty_packed(model)
        stats.sealed_gram, stats.sealed_reference_time = _add_reading(
            sealed,
            stats.sealed_reference_time,
            exposure,
            time,
            observation.value,
            model,
            covariates,
        )
        stats.sealed_count_exposed += exposed
        stats.sealed_count_unexposed += not exposed
        if window is not None:
            _sync_window(stats, window)
            stats.sealed_window_gram, stats.sealed_window_reference_time = add_reading(
                stats.sealed_window_gram or empty_packed(window),
                stats.sealed_window_reference_time,
                exposure,
                time,
                observation.value,
                window,
                covariates,
            )
    else:
        stats.recent.append(
            reading_of(time, observation.value, observation.adherence, list(covariates))
        )
        _seal(record, stats, model)
    if window is not None:
        _add_to_window(record, stats, window, exposure, time, observation.value, covariates)
    if stats.last_event_time is None or observation.event_time > stats.last_event_time:
        stats.last_event_time = observation.event_time


def _add_observations(
    record: PatientRecord, observations: list[Observation], model: ModelConfig
) -> None:
    """``_add_observation``'s statistics of each of ``observations`` (one
    measure's, not seen before, in order), the same bit for bit: a run of
    readings that neither seals nor starts the measure, in the recent part
    with the window kept, goes through model.evidence.add_vectors at once;
    any other reading (and every Bernoulli or Poisson one) one at a time."""
    measure = observations[0].measure
    stats = record.measures.get(measure)
    window = model.recent_window
    start = 0
    if stats is None:  # the first reading makes the measure's statistics
        _add_observation_stats(record, observations[0], model)
        stats, start = record.measures[measure], 1
    gaussian = model.family == "gaussian"
    room = 2 * RECENT_KEEP - len(stats.recent)  # readings before _seal would fold any
    keeps = window is None or stats.keeps_window(window)
    batch: list[tuple[Observation, float]] = []
    for observation in observations[start:]:
        time = days(observation.event_time)
        if gaussian and keeps and len(batch) < room and time >= stats.sealed_until:
            batch.append((observation, time))
            continue
        _add_batch(record, stats, batch, model, window)
        batch = []
        _add_observation_stats(record, observation, model)
        room = 2 * RECENT_KEEP - len(stats.recent)
        keeps = window is None or stats.keeps_window(window)
    _add_batch(record, stats, batch, model, window)


def _add_batch(
    record: PatientRecord,
    stats: MeasureStats,
    batch: list[tuple[Observation, float]],
    model: ModelConfig,
    window: ModelConfig | None,
) -> None:
    """The statistics of (reading, time in days) of the recent part that
    leave it within 2·RECENT_KEEP (no sealing), all-time and ``window``
    (model.recent_window), added at once."""
    if not batch:
        return
    rows = []
    times = []
    exposed = 0
    latest = stats.last_event_time
    recent = stats.recent
    for observation, time in batch:
        exposure = record.exposure_at(time) * observation.adherence
        covariates = observation.time_covariates
        rows.append((exposure, time, observation.value, covariates))
        times.append(time)
        exposed += exposure != 0
        recent.append(reading_of(time, observation.value, observation.adherence, covariates))
        if latest is None or observation.event_time > latest:
            latest = observation.event_time
    vectors = reading_vectors(rows, model)  # the window's too: the same standardisation
    stats.gram, stats.reference_time = add_vectors(
        stats.gram, stats.reference_time, times, vectors, model.half_life
    )
    stats.count_exposed += exposed
    stats.count_unexposed += len(batch) - exposed
    if window is not None:
        stats.window_gram, stats.window_reference_time = add_vectors(
            stats.window_gram, stats.window_reference_time, times, vectors, window.half_life
        )
    stats.last_event_time = latest


def apply_observations(
    record: PatientRecord, observations: list[Observation], models: dict[str, ModelConfig]
) -> tuple[Outcome, list[bool]]:
    """``apply_event(record, o, models, copy=False)`` of each of an enrolled
    patient's ``observations`` in turn, with one outcome for all: the same
    record bit for bit, each reading's de-duplication in its turn, and each
    measure's new readings added together (``_add_observations``). Returns
    the outcome and whether each observation was applied (not a replay or a
    duplicate). ``record`` is modified in place, and is in an undefined state
    if this raises."""
    if not record.enrolled:
        raise ValueError("apply_observations is for an enrolled patient")
    outcome = Outcome()
    applied: list[bool] = []
    by_measure: dict[str, list[Observation]] = {}
    for observation in observations:
        digest = event_digest(observation.event_id)
        if _seen_before(record, digest, observation.event_id, observation.origin, outcome,
                        observation):  # fmt: skip
            applied.append(False)
            continue
        # remembered before its statistics are added: nothing reads the index there
        _remember(record, digest, observation.origin)
        by_measure.setdefault(observation.measure, []).append(observation)
        applied.append(True)
    for measure, readings in by_measure.items():
        _add_observations(record, readings, models[measure])
        outcome.touched.add(measure)
    return outcome, applied


def _change_exposure(
    record: PatientRecord,
    event: EnrollmentRecord,
    time: float,
    exposure: float,
    models: dict[str, ModelConfig],
    outcome: Outcome,
) -> bool:
    """Insert a timeline entry and re-derive the statistics of readings it governs.
    Refused (False) when it would change readings already sealed."""
    for name, stats in record.measures.items():
        if time < stats.sealed_until:
            outcome.rejected.append(
                (
                    event,
                    "late_exposure_change",
                    f"exposure change at day {time:.3f} is older than the sealed evidence "
                    f"of {name} (reorder window {REORDER_WINDOW_DAYS:g} days)",
                )
            )
            return False
    bisect.insort(record.timeline, (time, exposure))
    for name, stats in record.measures.items():
        if any(r[0] >= time for r in stats.recent):
            _rederive(record, stats, models[name])
            outcome.touched.add(name)
    return True


def _copy(record: PatientRecord) -> PatientRecord:
    """A copy that shares nothing this module mutates: the containers are copied,
    their immutable items (tuples, strings, frozen events) shared. Much cheaper
    than ``model_copy(deep=True)``, whose cost grows with every event id seen."""
    return record.model_copy(
        update={
            "timeline": list(record.timeline),
            "seen_partitions": list(record.seen_partitions),
            "forgotten": dict(record.forgotten),
            "pending": list(record.pending),
            "measures": {
                name: stats.model_copy(update={"recent": list(stats.recent)})
                for name, stats in record.measures.items()
            },
            "published": dict(record.published),
            "published_joint": dict(record.published_joint),
        }
    )


def apply_event(
    record: PatientRecord | None,
    event: Observation | EnrollmentRecord,
    models: dict[str, ModelConfig],
    *,
    copy: bool = True,
) -> tuple[PatientRecord, Outcome]:
    """Apply one event to a patient's record (a copy; the input is not modified).

    ``models``: the ModelConfig of every measure in the catalogue (observations
    were validated against it, so the measure is known). ``copy=False`` hands
    ``record`` over: it is modified in place and returned, and is in an undefined
    state if this raises (for a record the caller has just parsed and drops on
    an error; the copy was a third of this function's cost).
    """
    if record is None:
        record = PatientRecord(patient_id=event.patient_id)
    elif copy:
        record = _copy(record)
    outcome = Outcome()
    if isinstance(event, Observation):
        digest = event_digest(event.event_id)
        if _seen_before(record, digest, event.event_id, event.origin, outcome, event):
            return record, outcome
        if not record.enrolled:
            held = next((p for p in record.pending if p.event_id == event.event_id), None)
            if held is not None:
                if origin_key(held.origin) == origin_key(event.origin):
                    outcome.replays += 1
                else:
                    outcome.rejected.append(
                        (event, "duplicate", f"event_id {event.event_id!r} is already held")
                    )
            elif len(record.pending) >= MAX_PENDING:
                outcome.rejected.append(
                    (event, "not_enrolled", f"no enrolment yet and {MAX_PENDING} readings held")
                )
            else:
                record.pending.append(event)
                outcome.held += 1
            return record, outcome
        _add_observation(record, event, models[event.measure], outcome, digest)
        return record, outcome

    inner = event.event
    digest = event_digest(inner.event_id)
    if _seen_before(record, digest, inner.event_id, event.origin, outcome, event):
        return record, outcome
    time = days(inner.event_time)
    exposure = inner.exposure if isinstance(inner, ExposureChange) else float(inner.exposed)
    if not _change_exposure(record, event, time, exposure, models, outcome):
        return record, outcome
    _remember(record, digest, event.origin)
    if isinstance(inner, Enrollment):
        covariates = list(event.covariates or ())
        levels = {level for model in models.values() for level in model.grouping_levels}
        groups = {level: inner.attributes[level] for level in levels if level in inner.attributes}
        outcome.cohort_changed = (
            record.cohort != inner.cohort
            or record.covariates != covariates
            or record.groups != groups
        )
        record.cohort, record.arm, record.enrolled_at = inner.cohort, inner.arm, inner.event_time
        record.covariates, record.groups = covariates, groups
        pending, record.pending = record.pending, []
        for observation in sorted(pending, key=lambda o: o.event_time):
            _add_observation(record, observation, models[observation.measure], outcome)
    return record, outcome
