"""A simulated programme as the records producers would publish (pure: no Kafka).

``build_programme`` runs ``model.simulate.simulate`` once per catalogue measure
(same seed, so every measure shares the patients, cohorts, enrolment times and
exposure schedule) and turns the draws into topic records:

- ``enrollments``: per patient an ``Enrollment`` (cohort ``clinic-NN``,
  ``exposed=False``) at its enrolment time, then one ``ExposureChange`` per
  change of the simulated exposure schedule (baseline then exposure: one
  start; crossover: start, stop, start).
- ``wearables`` / ``labs`` / ``pros``: one reading per simulated observation on
  the measure's first catalogue source, ``event_time = start + time`` days, in
  the canonical unit or (a fraction ``alternative_unit_fraction``) converted
  to another accepted unit.
- Optionally injected bad records (each with its expected dead-letter reason)
  and duplicates (the same bytes re-sent, same event id).

Exposure contract (what the pipeline must implement to recover the simulated
exposure): the exposure of a patient at time t is the ``exposure`` of the
latest ``ExposureChange`` with ``event_time <= t``, or 0 when there is none
(the ``Enrollment`` says ``exposed=False``). A change at exactly a reading's
event time governs that reading. ``build_programme`` checks this contract on
every reading at microsecond resolution (the resolution of ``event_time``)
before returning. A simulated wearable with a daily cycle (``daily_amplitudes``)
reads at a random hour of each day, which can put a reading before its
patient's enrolment or across an exposure change; no event can give such a
reading its simulated exposure, so it is left out (about 0.5% of readings).

Known simplification: since all measures come from the same seed, a patient's
standardised latent deviations (intercept, effect, residuals) are shared
across measures; each measure on its own is an exact draw of the model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from model.config import ModelConfig
from model.covariates import reading_design
from model.evidence import PatientStats, stats_from_events
from model.simulate import ProgrammeSpec, Simulated, exposure_schedule, simulate
from streams.catalogue import Catalogue, MeasureSpec, Source
from streams.patient_state import days
from streams.schemas import (
    TOPIC_SCHEMAS,
    Enrollment,
    ExposureChange,
    LabResult,
    PatientReportedOutcome,
    RawObservation,
    WearableReading,
)

if TYPE_CHECKING:
    from streams.chunked_consumer import ChunkRecord

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
MICROS_PER_DAY = 86_400_000_000

#: The source topic (unprefixed) of each catalogue source.
SOURCE_TOPIC: dict[Source, str] = {"wearable": "wearables", "lab": "labs", "pro": "pros"}
_READING_MODEL: dict[str, type[RawObservation]] = {
    "wearables": WearableReading,
    "labs": LabResult,
    "pros": PatientReportedOutcome,
}
_PRODUCER_FIELD: dict[str, tuple[str, str]] = {
    "wearables": ("device", "sim-wearable"),
    "labs": ("laboratory", "sim-lab"),
    "pros": ("instrument", "sim-pro-app"),
}

BadKind = Literal[
    "malformed_json",
    "missing_field",
    "unknown_measure",
    "unknown_unit",
    "implausible_value",
    "wrong_key",
]
BAD_KINDS: tuple[BadKind, ...] = (
    "malformed_json",
    "missing_field",
    "unknown_measure",
    "unknown_unit",
    "implausible_value",
    "wrong_key",
)
#: The dead-letter ``reason`` the ingest agent is expected to give each kind.
EXPECTED_REASON: dict[str, str] = {
    "malformed_json": "malformed_json",
    "missing_field": "invalid_schema",
    "unknown_measure": "unknown_measure",
    "unknown_unit": "unknown_unit",
    "implausible_value": "implausible_value",
    "wrong_key": "key_mismatch",
}
UNKNOWN_MEASURE = "not_a_catalogue_measure"
UNKNOWN_UNIT = "furlongs/fortnight"

Label = Literal["enrollment", "exposure", "valid", "duplicate"] | BadKind


@dataclass(frozen=True)
class Record:
    """One record as a producer sends it, plus what the simulation knows of it.

    ``topic`` is unprefixed (``Settings.topic`` adds the prefix). ``label`` is
    ``enrollment`` / ``exposure`` / ``valid`` / ``duplicate`` or the bad kind.
    ``measure`` is set for readings. ``canonical_value`` (the simulated value in
    the canonical unit) and ``exposure`` (the simulated exposure) are set
    exactly for simulated readings: ``valid``, their ``duplicate`` copies, and
    simulated values outside the plausible range (label ``implausible_value``);
    injected bad records have None there, and their ``event_id`` may not be
    readable from ``value``. Enrolment records carry the exposure they set.
    """

    topic: str
    key: bytes | None
    value: bytes
    event_id: str
    event_time: datetime
    patient_id: str
    label: Label
    measure: str | None = None
    canonical_value: float | None = None
    exposure: float | None = None
    time_covariates: tuple[float, ...] = ()  # a simulated reading's, the catalogue's order


class MeasureTruth(BaseModel):
    """The truth of one measure (canonical unit; effects per unit exposure)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: str
    direction: Literal["higher", "lower"]
    mcid: float
    source_topic: str
    population_effect: float
    cohort_effect: dict[str, float]
    spec: ProgrammeSpec
    valid_unique_readings: int


class PatientTruth(BaseModel):
    """One patient: cohort, enrolment, exposure changes and true effects by measure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cohort: str
    enrolment_time: datetime
    exposure_changes: list[tuple[datetime, float]]
    effect: dict[str, float]
    intercept: dict[str, float]
    valid_unique_readings: dict[str, int]
    covariates: dict[str, float | str] = Field(
        default_factory=dict, description="what the enrolment carried (simulated with them)"
    )


class BadRecordTruth(BaseModel):
    """A record the ingest must dead-letter, and the reason it must give."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    kind: str
    reason: str
    event_id: str
    patient_id: str
    key: str | None
    injected: bool  # False: a simulated value that fell outside the plausible range


class DuplicateTruth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    event_id: str
    patient_id: str


class TopicSent(BaseModel):
    """What a topic receives: the record count and an order-free digest of the
    (key, value) pairs (``records_digest``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    records: int
    digest: str


class GroundTruth(BaseModel):
    """Everything a test needs to judge the pipeline on this programme (JSON-able)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    design: Literal["baseline_then_exposure", "crossover"]
    start: datetime
    time_span_days: float
    measures: dict[str, MeasureTruth]
    patients: dict[str, PatientTruth]
    enrollment_events: int
    valid_unique_readings: int
    bad_records: list[BadRecordTruth]
    duplicates: list[DuplicateTruth]
    sent: dict[str, TopicSent]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> GroundTruth:
        return cls.model_validate_json(text)


@dataclass(frozen=True)
class Programme:
    """Records per unprefixed topic (each list in send order) and the truth."""

    records: dict[str, list[Record]]
    truth: GroundTruth
    simulated: dict[str, Simulated] = field(repr=False)

    def send_order(self) -> list[Record]:
        """Every record in the order to publish: all enrolment/exposure events
        first, then the source topics' records merged by event time (stable, so
        each topic's own order, duplicates and bad records included, is kept)."""
        readings = [r for topic, rs in self.records.items() if topic != "enrollments" for r in rs]
        # Stable merge: sort by event time, ties by position in the topic list.
        position = {id(r): i for rs in self.records.values() for i, r in enumerate(rs)}
        readings.sort(key=lambda r: (r.event_time, position[id(r)]))
        return [*self.records.get("enrollments", []), *readings]

    def as_read(self, topic_prefix: str, partitions: int) -> list[ChunkRecord]:
        """The send order as a worker reads it (streams.patient_step.RawRecord):
        prefixed topics, each keyed record on its key's partition (Kafka's
        murmur2 partitioner), per-partition offsets, the event time as the
        record timestamp (seconds)."""
        from streams.chunked_consumer import ChunkRecord
        from streams.partitioning import key_partition

        offsets: dict[tuple[str, int], int] = {}
        records = []
        for record in self.send_order():
            topic = topic_prefix + record.topic
            partition = key_partition(record.key, partitions) if record.key else 0
            offset = offsets.get((topic, partition), 0)
            offsets[(topic, partition)] = offset + 1
            stamp = record.event_time.timestamp()
            records.append(ChunkRecord(record.key, record.value, topic, partition, offset, stamp))
        return records

    @staticmethod
    def _reading_row(record: Record, model: ModelConfig, spec: MeasureSpec | None) -> list[float]:
        """A reading's time covariates as the stream builds them: sent without the
        catalogue's ones, each is at its centre (the validation encodes an absent
        optional value so), then the measure's daily-cycle terms."""
        values = list(record.time_covariates)
        if spec is None:
            return values
        own = len(model.time_covariates) - 2 * spec.daily_cycle
        if len(values) != own:
            values = list(model.standardization.time_covariate_location[:own])
        return spec.time_covariate_row(values, record.event_time)

    def expected_statistics(
        self,
        measure: str,
        model: ModelConfig,
        patients: Sequence[str] | None = None,
        spec: MeasureSpec | None = None,
    ) -> PatientStats:
        """The batch computation over the unique valid readings of ``measure``
        with the simulated exposure: what the pipeline's patient statistics must
        equal, whatever the arrival order, replays and duplicates. Rows follow
        ``patients`` (default: every patient id, sorted). ``spec``: the
        measure's catalogue entry, whose daily cycle (if any) adds its terms to
        each reading's covariates as the stream does (MeasureSpec.time_covariate_row)."""
        patients = sorted(self.truth.patients) if patients is None else list(patients)
        index = {p: i for i, p in enumerate(patients)}
        topic = self.truth.measures[measure].source_topic
        valid = [r for r in self.records[topic] if r.label == "valid" and r.measure == measure]
        return stats_from_events(
            len(patients),
            np.array([index[r.patient_id] for r in valid], dtype=np.int64),
            np.array([r.exposure for r in valid]),
            np.array([days(r.event_time) for r in valid]),
            np.array([r.canonical_value for r in valid]),
            model,
            # A reading without them is taken at their centre, as the stream does;
            # with a daily cycle, the measure's row ends with its terms.
            time_covariates=reading_design(
                [self._reading_row(r, model, spec) for r in valid], model
            ),
        )


def records_digest(records: Iterable[tuple[bytes | None, bytes]]) -> str:
    """Order-independent SHA-256 of a multiset of (key, value) records: equal
    digests mean the same records, each the same number of times."""
    hashes = []
    for key, value in records:
        h = hashlib.sha256()
        h.update(b"k" if key is not None else b"-")
        h.update(len(key or b"").to_bytes(8, "big"))
        h.update(key or b"")
        h.update(value)
        hashes.append(h.hexdigest())
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


#: The simulated covariates as an enrolment carries them: age in years (one
#: decimal) and group as a letter (level 0: "A"); readings carry the
#: time-varying ``activity`` when the simulation has it. SIMULATED_COVARIATES is
#: the catalogue section that declares them (docs/covariates.md).
GROUP_LEVELS = "ABCDEFGH"
SIMULATED_COVARIATES = """
[covariates.age]
kind = "numeric"
unit = "years"
plausible = [18.0, 110.0]
typical = [55.0, 12.0]

[covariates.group]
kind = "categorical"
levels = ["A", "B"]

[covariates.activity]
kind = "numeric"
varies = "reading"
typical = [0.0, 1.0]
required = false
"""


def _absent_extras(reading: RawObservation) -> set[str]:
    """A reading's optional adherence and covariates when it has none: left out
    of the JSON, as a producer that does not use them sends it."""
    absent = set()
    if reading.adherence is None:
        absent.add("adherence")
    if not reading.covariates:
        absent.add("covariates")
    return absent


def enrolment_covariates(sim: Simulated) -> list[dict[str, float | str]]:
    """Each patient's covariates (model.simulate's age and group) as an
    enrolment's ``covariates``; empty dicts when the simulation has none."""
    covariates = sim.events.covariates
    if covariates is None:
        return [{} for _ in range(sim.events.num_patients)]
    result = []
    for row in covariates:
        group = int(np.argmax(row[1:]) + 1) if row[1:].any() else 0
        result.append({"age": round(float(row[0]), 1), "group": GROUP_LEVELS[group]})
    return result


def _same_covariates(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def spec_for_measure(
    measure: MeasureSpec,
    *,
    num_patients: int,
    num_cohorts: int,
    obs_per_patient: int,
    design: Literal["baseline_then_exposure", "crossover"] = "baseline_then_exposure",
    time_span: float = 90.0,
    **overrides: Any,
) -> ProgrammeSpec:
    """A ProgrammeSpec in the measure's canonical unit, from its catalogue entry.

    Population effect 1.2 MCID in the direction of benefit, patient effect SD
    0.8 MCID, cohort effect SD 0.3 MCID; intercept SD 0.6 and residual SD 0.5 of
    the catalogue's typical spread. The intercept starts at the typical value
    and moves (and, failing that, all spreads shrink) until baseline and
    exposed readings stay within the plausible range by 3.5 marginal SDs, so
    simulated values rarely fall outside it. ``overrides`` replace any field.
    """
    location, scale = measure.typical
    low, high = measure.plausible
    sign = 1.0 if measure.direction == "higher" else -1.0
    effect = sign * 1.2 * measure.mcid
    spreads = {
        "intercept_sd": 0.6 * scale,
        "residual_sd": 0.5 * scale,
        "effect_sd": 0.8 * measure.mcid,
        "cohort_effect_sd": 0.3 * measure.mcid,
    }
    intercept = location
    for _ in range(60):
        sd_base = math.hypot(spreads["intercept_sd"], spreads["residual_sd"])
        sd_exposed = math.sqrt(sum(v * v for v in spreads.values()))
        lower = max(low + 3.5 * sd_base, low + 3.5 * sd_exposed - effect)
        upper = min(high - 3.5 * sd_base, high - 3.5 * sd_exposed - effect)
        if lower <= upper:
            intercept = min(max(location, lower), upper)
            break
        spreads = {name: 0.9 * value for name, value in spreads.items()}
    values: dict[str, Any] = {
        "num_patients": num_patients,
        "num_cohorts": num_cohorts,
        "obs_per_patient": obs_per_patient,
        "design": design,
        "time_span": time_span,
        "intercept": intercept,
        "effect": effect,
        "time_trend": 0.0,
        **spreads,
    }
    values.update(overrides)
    return ProgrammeSpec(**values)


def exposure_change_phases(spec: ProgrammeSpec) -> list[tuple[float, float]]:
    """(phase in [0, 1), exposure from then on) at every change of
    ``model.simulate.exposure_schedule`` (left-closed, as simulate assigns it),
    starting from exposure 0 at enrolment."""
    points = {0.0, spec.baseline_fraction}
    if spec.design == "crossover":
        exposed_span = 1.0 - spec.baseline_fraction
        points |= {
            spec.baseline_fraction + exposed_span / 3.0,
            spec.baseline_fraction + 2.0 * exposed_span / 3.0,
        }
    changes, current = [], 0.0
    for phase in sorted(p for p in points if p < 1.0):
        exposure = float(exposure_schedule(spec, np.array([phase]))[0])
        if exposure != current:
            changes.append((phase, exposure))
            current = exposure
    return changes


def _micros(days: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(days, dtype=np.float64) * MICROS_PER_DAY).astype(np.int64)


def _at(start: datetime, micros: int) -> datetime:
    return start + timedelta(microseconds=int(micros))


def _label_width(count: int) -> int:
    return max(2, len(str(max(count - 1, 0))))


def build_programme(
    measures: Sequence[str],
    *,
    catalogue: Catalogue | None = None,
    num_patients: int = 200,
    num_cohorts: int = 10,
    obs_per_patient: int = 30,
    design: Literal["baseline_then_exposure", "crossover"] = "baseline_then_exposure",
    time_span: float = 90.0,
    seed: int = 0,
    start: datetime = DEFAULT_START,
    bad_fraction: float = 0.0,
    duplicate_fraction: float = 0.0,
    alternative_unit_fraction: float = 0.1,
    spec_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    run_id: str | None = None,
) -> Programme:
    """Simulate a programme for ``measures`` and return its records and truth.

    Deterministic given the arguments. ``bad_fraction`` and
    ``duplicate_fraction`` are relative to the number of simulated readings:
    ``round(f * n)`` extra bad records (kinds cycled through ``BAD_KINDS``) and
    re-sent valid readings are added. ``spec_overrides[measure]`` replaces
    ProgrammeSpec fields of that measure (structure fields such as
    ``num_patients`` or ``time_span`` must agree across measures). Event ids
    are ``{run_id}-...`` (default ``sim{seed}``), unique within the programme.
    Raises UnknownMeasure, ValueError for bad arguments or measures whose
    simulations disagree on structure.
    """
    if not measures:
        raise ValueError("at least one measure is needed")
    if len(set(measures)) != len(measures):
        raise ValueError(f"measures repeat: {list(measures)}")
    for name, value in (
        ("bad_fraction", bad_fraction),
        ("duplicate_fraction", duplicate_fraction),
        ("alternative_unit_fraction", alternative_unit_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if start.tzinfo is None:
        raise ValueError("start must carry a timezone")
    catalogue = catalogue or Catalogue.load()
    run_id = run_id or f"sim{seed}"
    overrides = spec_overrides or {}
    specs = {name: catalogue.get(name) for name in measures}
    simulated = {
        name: simulate(
            spec_for_measure(
                specs[name],
                **{
                    "num_patients": num_patients,
                    "num_cohorts": num_cohorts,
                    "obs_per_patient": obs_per_patient,
                    "design": design,
                    "time_span": time_span,
                    **overrides.get(name, {}),
                },
            ),
            seed,
        )
        for name in measures
    }
    first = simulated[measures[0]]
    for name, sim in simulated.items():
        if not (
            np.array_equal(sim.events.cohort_of_patient, first.events.cohort_of_patient)
            and _same_covariates(sim.events.covariates, first.events.covariates)
            and np.array_equal(sim.truth.enrolment_time, first.truth.enrolment_time)
            and exposure_change_phases(sim.spec) == exposure_change_phases(first.spec)
            and sim.spec.time_span == first.spec.time_span
        ):
            raise ValueError(f"measure {name}: overrides change the programme's structure")

    rng = np.random.default_rng([seed, 0x5EED])
    patients = [f"patient-{i:0{_label_width(num_patients)}d}" for i in range(num_patients)]
    cohorts = [f"clinic-{g:0{_label_width(num_cohorts)}d}" for g in range(num_cohorts)]
    cohort_of = [cohorts[int(g)] for g in first.events.cohort_of_patient]
    span = first.spec.time_span
    enrol_us = _micros(first.truth.enrolment_time)
    changes = exposure_change_phases(first.spec)
    # Same float operations as simulate: enrolment + phase * span.
    change_us = [_micros(first.truth.enrolment_time + phase * span) for phase, _ in changes]
    counter = iter(range(1 << 62))

    def next_id(kind: str) -> str:
        return f"{run_id}-{kind}-{next(counter):08d}"

    # --- enrollments topic -----------------------------------------------------
    enrollment_items: list[tuple[int, int, Record]] = []
    covariates_of = enrolment_covariates(first)
    for i, patient in enumerate(patients):
        event = Enrollment(
            event_id=next_id("enr"),
            event_time=_at(start, enrol_us[i]),
            patient_id=patient,
            cohort=cohort_of[i],
            attributes={"site": cohort_of[i], "programme": run_id},
            exposed=False,
            covariates=covariates_of[i],
        )
        enrollment_items.append(
            (int(enrol_us[i]), len(enrollment_items), _enrollment_record(event, "enrollment"))
        )
        for (_, exposure), times in zip(changes, change_us, strict=True):
            change = ExposureChange(
                event_id=next_id("exp"),
                event_time=_at(start, times[i]),
                patient_id=patient,
                exposure=exposure,
            )
            enrollment_items.append(
                (int(times[i]), len(enrollment_items), _enrollment_record(change, "exposure"))
            )
    enrollment_items.sort(key=lambda item: item[:2])

    # --- readings ----------------------------------------------------------------
    readings: dict[str, list[tuple[int, int, Record]]] = {}
    bad_truth: list[BadRecordTruth] = []
    valid_by_patient = {p: dict.fromkeys(measures, 0) for p in patients}
    valid_by_measure = dict.fromkeys(measures, 0)
    for name in measures:
        spec_m, sim = specs[name], simulated[name]
        topic = SOURCE_TOPIC[spec_m.sources[0]]
        model = _READING_MODEL[topic]
        extra_field, extra_value = _PRODUCER_FIELD[topic]
        events = sim.events
        reading_us = _micros(events.time)
        # The exposure-change events carry the dose; a reading's adherence scales it.
        scheduled = np.where(events.exposure > 0, sim.spec.dose, 0.0)
        keep = np.ones(reading_us.size, dtype=bool)
        if sim.spec.daily_amplitudes:
            # A wearable reads at a random hour of each day (model.simulate): a
            # reading whose hour falls before its patient's enrolment or across an
            # exposure change has an exposure no enrolment or exposure-change event
            # can give it (the dose in force at its time) and is left out.
            keep = _expressible(reading_us, events.patient, scheduled, enrol_us, change_us, changes)
        reading_us = reading_us.copy()
        reading_us[keep] = _honour_exposure(
            reading_us[keep], events.patient[keep], scheduled[keep], enrol_us, change_us, changes
        )
        alternatives = list(spec_m.units.items())
        use_alternative = rng.uniform(size=reading_us.size) < alternative_unit_fraction
        unit_choice = rng.integers(0, max(len(alternatives), 1), reading_us.size)
        bucket = readings.setdefault(topic, [])
        dose = sim.spec.dose
        for row in np.flatnonzero(keep):
            i = int(events.patient[row])
            extras: dict[str, Any] = {}
            if sim.spec.adherence_low < 1.0 and events.exposure[row] > 0:
                extras["adherence"] = float(events.exposure[row]) / dose
            if events.time_covariates is not None:
                extras["covariates"] = {
                    name: float(events.time_covariates[row, k])
                    for k, name in enumerate(events.time_covariate_names)
                }
            canonical = float(events.outcome[row])
            unit, value = spec_m.unit, canonical
            if alternatives and use_alternative[row]:
                unit, conversion = alternatives[int(unit_choice[row])]
                value = (canonical - conversion.offset) / conversion.scale
            reading = model(
                event_id=next_id("obs"),
                event_time=_at(start, reading_us[row]),
                patient_id=patients[i],
                measure=name,
                value=value,
                unit=unit,
                **{extra_field: extra_value},
                **extras,
            )
            plausible = spec_m.plausible_value(canonical)
            label: Label = "valid" if plausible else "implausible_value"
            record = Record(
                topic=topic,
                key=patients[i].encode(),
                value=reading.model_dump_json(exclude=_absent_extras(reading)).encode(),
                event_id=reading.event_id,
                event_time=reading.event_time,
                patient_id=patients[i],
                label=label,
                measure=name,
                canonical_value=canonical,
                exposure=float(events.exposure[row]),
                time_covariates=tuple(extras.get("covariates", {}).values()),
            )
            bucket.append((int(reading_us[row]), len(bucket), record))
            if plausible:
                valid_by_patient[patients[i]][name] += 1
                valid_by_measure[name] += 1
            else:
                bad_truth.append(_bad_truth(record, "implausible_value", injected=False))

    total_readings = sum(len(bucket) for bucket in readings.values())
    all_valid = [
        (topic, item)
        for topic, bucket in readings.items()
        for item in bucket
        if item[2].label == "valid"
    ]

    # --- injected bad records: extra records, each with one defect -------------
    bad_count = round(bad_fraction * total_readings) if all_valid else 0
    for n in range(bad_count):
        kind = BAD_KINDS[n % len(BAD_KINDS)]
        topic, (micros, _, template) = all_valid[int(rng.integers(len(all_valid)))]
        record = _corrupt(template, kind, next_id("bad"), catalogue, patients, rng)
        readings[topic].append((micros, len(readings[topic]), record))
        bad_truth.append(_bad_truth(record, kind, injected=True))

    ordered: dict[str, list[Record]] = {"enrollments": [item[2] for item in enrollment_items]}
    for topic in sorted(readings):
        ordered[topic] = [item[2] for item in sorted(readings[topic], key=lambda x: x[:2])]

    # --- duplicates: a valid reading re-sent a few records later ---------------
    duplicate_truth: list[DuplicateTruth] = []
    dup_count = round(duplicate_fraction * total_readings) if all_valid else 0
    picks = rng.choice(len(all_valid), size=dup_count, replace=dup_count > len(all_valid))
    inserts: dict[str, dict[int, list[Record]]] = {}
    for pick in sorted(int(p) for p in picks):
        topic, (_, _, original) = all_valid[pick]
        inserts.setdefault(topic, {}).setdefault(id(original), []).append(
            replace(original, label="duplicate")
        )
        duplicate_truth.append(
            DuplicateTruth(topic=topic, event_id=original.event_id, patient_id=original.patient_id)
        )
    for topic, by_original in inserts.items():
        records = ordered[topic]
        pending: list[tuple[int, Record]] = []  # (index to send after, duplicate)
        for index, record in enumerate(records):
            for duplicate in by_original.get(id(record), []):
                pending.append((index + int(rng.integers(0, 20)), duplicate))
        pending.sort(key=lambda item: item[0])
        merged, cursor = [], 0
        for index, record in enumerate(records):
            merged.append(record)
            while cursor < len(pending) and min(pending[cursor][0], len(records) - 1) == index:
                merged.append(pending[cursor][1])
                cursor += 1
        ordered[topic] = merged

    truth = GroundTruth(
        seed=seed,
        design=design,
        start=start,
        time_span_days=span,
        measures={
            name: MeasureTruth(
                unit=specs[name].unit,
                direction=specs[name].direction,
                mcid=specs[name].mcid,
                source_topic=SOURCE_TOPIC[specs[name].sources[0]],
                population_effect=simulated[name].truth.population_effect,
                cohort_effect={
                    cohorts[g]: float(u) for g, u in enumerate(simulated[name].truth.cohort_effect)
                },
                spec=simulated[name].spec,
                valid_unique_readings=valid_by_measure[name],
            )
            for name in measures
        },
        patients={
            patient: PatientTruth(
                cohort=cohort_of[i],
                enrolment_time=_at(start, enrol_us[i]),
                exposure_changes=[
                    (_at(start, times[i]), exposure)
                    for (_, exposure), times in zip(changes, change_us, strict=True)
                ],
                effect={name: float(simulated[name].truth.effect[i]) for name in measures},
                intercept={name: float(simulated[name].truth.intercept[i]) for name in measures},
                valid_unique_readings=valid_by_patient[patient],
                covariates=covariates_of[i],
            )
            for i, patient in enumerate(patients)
        },
        enrollment_events=len(ordered["enrollments"]),
        valid_unique_readings=sum(valid_by_measure.values()),
        bad_records=bad_truth,
        duplicates=duplicate_truth,
        sent={
            topic: TopicSent(
                records=len(records), digest=records_digest((r.key, r.value) for r in records)
            )
            for topic, records in ordered.items()
        },
    )
    return Programme(records=ordered, truth=truth, simulated=simulated)


def _enrollment_record(event: Enrollment | ExposureChange, label: Label) -> Record:
    return Record(
        topic="enrollments",
        key=event.patient_id.encode(),
        value=event.model_dump_json().encode(),
        event_id=event.event_id,
        event_time=event.event_time,
        patient_id=event.patient_id,
        label=label,
        exposure=event.exposure if isinstance(event, ExposureChange) else 0.0,
    )


def _expressible(
    reading_us: np.ndarray,
    patient: np.ndarray,
    exposure: np.ndarray,
    enrol_us: np.ndarray,
    change_us: list[np.ndarray],
    changes: list[tuple[float, float]],
) -> np.ndarray:
    """Which readings the enrolment and exposure-change events can express: at
    or after their patient's enrolment, with the dose in force at their time
    (or 1 µs earlier, as _honour_exposure moves them)."""
    at = _dose_at(reading_us, patient, change_us, changes)
    before = _dose_at(reading_us - 1, patient, change_us, changes)
    return ((at == exposure) | (before == exposure)) & (reading_us >= enrol_us[patient])


def _dose_at(
    reading_us: np.ndarray,
    patient: np.ndarray,
    change_us: list[np.ndarray],
    changes: list[tuple[float, float]],
) -> np.ndarray:
    """The dose in force at each reading's time: the last change at or before it."""
    value = np.zeros(reading_us.shape)
    for (_, x), times in zip(changes, change_us, strict=True):
        value = np.where(times[patient] <= reading_us, x, value)
    return value


def _honour_exposure(
    reading_us: np.ndarray,
    patient: np.ndarray,
    exposure: np.ndarray,
    enrol_us: np.ndarray,
    change_us: list[np.ndarray],
    changes: list[tuple[float, float]],
) -> np.ndarray:
    """Reading times (µs) adjusted so that the exposure contract holds.

    simulate compares phases; event times are rounded to microseconds, which can
    make a reading just before a change land on the change's microsecond. Such a
    reading moves 1 µs earlier. Raises RuntimeError if the contract still fails.
    """
    reading_us = reading_us.copy()

    def derived() -> np.ndarray:
        return _dose_at(reading_us, patient, change_us, changes)

    wrong = derived() != exposure
    reading_us[wrong] -= 1
    if np.any(derived() != exposure) or np.any(reading_us < enrol_us[patient]):
        raise RuntimeError("simulated exposure cannot be expressed by exposure-change events")
    return reading_us


def _bad_truth(record: Record, kind: str, *, injected: bool) -> BadRecordTruth:
    return BadRecordTruth(
        topic=record.topic,
        kind=kind,
        reason=EXPECTED_REASON[kind],
        event_id=record.event_id,
        patient_id=record.patient_id,
        key=record.key.decode() if record.key is not None else None,
        injected=injected,
    )


def _corrupt(
    template: Record,
    kind: BadKind,
    event_id: str,
    catalogue: Catalogue,
    patients: list[str],
    rng: np.random.Generator,
) -> Record:
    """A copy of a valid reading with a fresh event id and exactly one defect."""
    body = json.loads(template.value)
    body["event_id"] = event_id
    key = template.key
    measure = catalogue.get(str(template.measure))
    if kind == "missing_field":
        del body["value"]
    elif kind == "unknown_measure":
        body["measure"] = UNKNOWN_MEASURE
    elif kind == "unknown_unit":
        body["unit"] = UNKNOWN_UNIT
    elif kind == "implausible_value":
        low, high = measure.plausible
        body["value"], body["unit"] = high + (high - low), measure.unit
    elif kind == "wrong_key":
        others = [p for p in patients if p != template.patient_id]
        key = (str(rng.choice(others)) if others else template.patient_id + "-other").encode()
    value = json.dumps(body).encode()
    if kind == "malformed_json":
        value = value[: len(value) // 2]
    return replace(
        template,
        key=key,
        value=value,
        event_id=event_id,
        label=kind,
        canonical_value=None,
        exposure=None,
    )


def topic_schema(topic: str) -> TypeAdapter:
    """Validator of a topic's values (from ``streams.schemas.TOPIC_SCHEMAS``)."""
    return TypeAdapter(TOPIC_SCHEMAS[topic])


def sample_messages() -> dict[str, Record]:
    """One record of every kind producers publish, from a tiny crossover
    programme (deterministic): ``enrollment``, ``exposure_start``,
    ``exposure_stop``, and a reading per source topic (``wearables``, ``labs``,
    ``pros``). docs/topics.md shows these."""
    programme = build_programme(
        ["resting_heart_rate", "hba1c", "phq9"],
        num_patients=3,
        num_cohorts=2,
        design="crossover",
        seed=7,
    )
    enrolment = programme.records["enrollments"]
    samples = {
        "enrollment": next(r for r in enrolment if r.label == "enrollment"),
        "exposure_start": next(r for r in enrolment if r.label == "exposure" and r.exposure),
        "exposure_stop": next(r for r in enrolment if r.label == "exposure" and not r.exposure),
    }
    for topic in ("wearables", "labs", "pros"):
        samples[topic] = next(r for r in programme.records[topic] if r.label == "valid")
    return samples
