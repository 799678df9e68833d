"""Event schemas of every topic (pydantic). Producers and consumers in any
language get them as JSON Schema from ``efficacy schemas --out DIR``.

Every message carries ``schema_version``, ``event_id`` (unique per event; used to
drop duplicates) and ``event_time`` (when it happened, not when it arrived).

| topic | key | value |
|---|---|---|
| enrollments | patient_id | Enrollment or ExposureChange (field ``kind``) |
| wearables / labs / pros | patient_id | WearableReading / LabResult / PatientReportedOutcome |
| fhir-observations | any | a FHIR R4 Observation or Bundle (streams.interop.fhir) |
| omh-datapoints | any | an Open mHealth data point (streams.interop.open_mhealth) |
| deadletter | source key | DeadLetter |
| population-evidence (internal) | measure | EvidenceBatch (PatientEvidence of many patients) |
| population-posterior | measure | PopulationPosterior |
| scores | patient_id | EfficacyScore |
| alerts | patient_id or measure | Alert |
| structure-selection | measure | StructureSelection |
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1
MAX_EVENT_ID = 128


def utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every message carries. Times must carry a timezone (ISO 8601)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=MAX_EVENT_ID)
    event_time: AwareDatetime


PatientId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s/]+$")]


def bounded_event_id(kind: str, identity: str) -> str:
    """``kind:identity`` as an event id, or ``kind:`` and the SHA-256 of the
    identity when that would be longer than MAX_EVENT_ID (a long patient id with
    several measures): the same identity always gives the same id."""
    event_id = f"{kind}:{identity}"
    if len(event_id) <= MAX_EVENT_ID:
        return event_id
    return f"{kind}:sha256:{hashlib.sha256(identity.encode()).hexdigest()}"


# --- enrolments and exposure (topic: enrollments) --------------------------------


class Enrollment(Envelope):
    """A patient joins the programme. ``cohort`` is the level of partial pooling
    (clinic, cohort or stratum); ``attributes`` are free cohort attributes.
    ``exposed`` says whether the intervention starts at enrolment."""

    kind: Literal["enrollment"] = "enrollment"
    patient_id: PatientId
    cohort: str = Field(min_length=1, max_length=128)
    arm: str = Field(default="intervention", min_length=1, max_length=64)
    attributes: dict[str, str] = Field(default_factory=dict)
    exposed: bool = False


class ExposureChange(Envelope):
    """The intervention starts (``exposure`` > 0, a dose; 1 for on/off) or stops
    (``exposure`` = 0) at ``event_time``: crossover and withdrawal."""

    kind: Literal["exposure"] = "exposure"
    patient_id: PatientId
    exposure: float = Field(ge=0.0, le=1e6)


#: The value of an enrollments record: either kind, told apart by ``kind``.
EnrollmentEvent = Annotated[Enrollment | ExposureChange, Field(discriminator="kind")]
ENROLLMENT_EVENT = TypeAdapter(EnrollmentEvent)


# --- raw observations (topics: wearables, labs, pros) ----------------------------


class RawObservation(Envelope):
    """A reading from a producer: wearable, lab or patient-reported outcome."""

    patient_id: PatientId
    measure: str = Field(min_length=1, max_length=64)
    value: float
    unit: str = Field(min_length=1, max_length=32)


class WearableReading(RawObservation):
    source: Literal["wearable"] = "wearable"
    device: str | None = None


class LabResult(RawObservation):
    source: Literal["lab"] = "lab"
    laboratory: str | None = None


class PatientReportedOutcome(RawObservation):
    source: Literal["pro"] = "pro"
    instrument: str | None = None


class Origin(BaseModel):
    """Where a record was first read: its identity for replay detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    partition: int
    offset: int
    timestamp: float | None = Field(
        default=None, description="the raw record's Kafka timestamp, seconds since the epoch"
    )


class Observation(Envelope):
    """A validated observation in the measure's canonical unit, with its origin
    (what the patients agent applies; held in a patient's record until enrolment)."""

    kind: Literal["observation"] = "observation"
    patient_id: PatientId
    measure: str
    value: float
    unit: str
    source: Literal["wearable", "lab", "pro"]
    origin: Origin


class EnrollmentRecord(BaseModel):
    """A validated enrolment or exposure event with its origin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["enrollment_record"] = "enrollment_record"
    event: EnrollmentEvent
    origin: Origin

    @property
    def patient_id(self) -> str:
        return self.event.patient_id


class DeadLetter(BaseModel):
    """A rejected record: its bytes, where it came from and why.

    ``source_topic``/``partition``/``offset`` always name the raw record as a
    producer sent it; they identify it (the topic is at-least-once: a record
    replayed after a crash may be dead-lettered twice). ``key_b64`` and
    ``value_b64`` are the raw record's key and bytes as the producer sent them,
    for rejections at ingest and after validation (``duplicate``,
    ``not_enrolled``, ``late_exposure_change``, ``processing_error``) alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    reason: str
    detail: str
    source_topic: str
    partition: int
    offset: int
    key_b64: str | None
    value_b64: str
    rejected_at: datetime = Field(default_factory=utc_now)


# --- internal: patient statistics for the population agent -----------------------


class PatientEvidence(BaseModel):
    """The latest sufficient statistics of one patient for one measure (not a
    delta: last write wins, so a replay is harmless). Standardised units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    measure: str
    patient_id: PatientId
    cohort: str
    gram: list[list[float]]
    reference_time: float
    count_exposed: int
    count_unexposed: int
    recent_gram: list[list[float]] | None = Field(
        default=None,
        description="the statistics under the recent-window forgetting (fast half-life), at "
        "the same reference time; drift monitoring fits them against the all-time ones",
    )


class EvidenceBatch(BaseModel):
    """The statistics of the patients of one measure that one batch of the
    patients agent changed: one message instead of one per patient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    measure: str
    items: list[PatientEvidence]


# --- outputs --------------------------------------------------------------------


class Interval(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float
    sd: float
    lower: float
    upper: float


class MeasureScore(BaseModel):
    """One measure's posterior of the patient's individual treatment effect, in
    the measure's unit per unit of exposure, with the decision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: str
    unit: str
    direction: Literal["higher", "lower"]
    mcid: float
    effect: Interval
    level: float = 0.9
    p_benefit_ge_mcid: float
    p_benefit_gt_0: float
    classification: Literal["responder", "non_responder", "uncertain", "insufficient_data"]
    recommended_action: str | None = None
    population_effect: float
    cohort_deviation: float
    individual_deviation: float
    shrinkage: float
    count_exposed: int
    count_unexposed: int
    last_event_time: datetime | None
    population_version: int


class CompositeScore(BaseModel):
    """Weighted mean over measures of the benefit in MCID units,
    Σ w_m sign_m b_m / MCID_m / Σ w_m (measures treated as independent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benefit_in_mcid: Interval
    measures: list[str]


class EfficacyScore(Envelope):
    """A patient's living efficacy score: every measure scored so far."""

    patient_id: PatientId
    cohort: str
    score_version: int
    decision_rule_version: str
    measures: list[MeasureScore]
    composite: CompositeScore | None = None


class PopulationPosterior(Envelope):
    """Versioned population posterior of one measure (compacted topic, key =
    measure). ``draws`` are fixed draws of θ (standardised units) that define
    every patient's mixture posterior; ``cohort_mean``/``cohort_var`` (S, G) the
    posterior of each cohort's effect deviation under each draw."""

    measure: str
    version: int
    num_patients: int
    num_observations: float
    elbo: float
    svi_steps: int
    converged: bool
    standardization: dict[str, float]
    draws: dict[str, list]
    cohorts: list[str]
    cohort_mean: list[list[float]]
    cohort_var: list[list[float]]
    summary: dict[str, Interval]
    unconstrained_loc: list[float]
    unconstrained_scale_tril: list[list[float]]
    drift: dict[str, float] = Field(
        default_factory=dict,
        description="movement since the reference posterior (monitoring.drift): kl, "
        "kl_location, shift, shift_z; with a recent-window fit also window_shift, "
        "recent_effect_mean and recent_effect_sd",
    )
    drift_detected: bool = False
    drift_kinds: list[Literal["posterior_shift", "window_shift"]] = Field(
        default_factory=list, description="the detectors that raised ``drift_detected``"
    )
    evidence_digest: str = Field(
        default="",
        description="digest of the patients' statistics this version was fitted on: "
        "the owner does not refit identical evidence (after a restart or a replay)",
    )
    rescore: bool = Field(
        default=True,
        description="moved materially: every worker republishes every score under it",
    )


class Alert(Envelope):
    """A responder transition with its recommended action, a drift alert
    (posterior shift or recent-window departure, ``statistics`` says which), or
    a prior-data conflict (incoming readings keep falling outside their
    posterior predictive; per measure, never per patient)."""

    kind: Literal["transition", "drift", "prior_data_conflict"]
    severity: Literal["info", "warning", "critical"] = "info"
    patient_id: PatientId | None = None
    measure: str
    message: str
    previous: str | None = None
    current: str | None = None
    recommended_action: str | None = None
    population_version: int | None = None
    statistics: dict[str, float] = Field(default_factory=dict)


class StructureScore(BaseModel):
    """One candidate structure's cross-validated predictive density (raw outcome,
    summed over held-out patients) and its difference to the best structure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    structure: str = Field(description="complete, none, partial or partial+cohort")
    elpd: float = Field(description="total elpd over held-out patients")
    elpd_se: float = Field(description="standard error of elpd, sqrt(n var(elpd_i))")
    elpd_diff: float = Field(description="elpd minus the best structure's elpd (<= 0)")
    diff_se: float = Field(description="standard error of elpd_diff, sqrt(n var(d_i))")


class StructureSelection(Envelope):
    """Which pooling structure one measure's evidence supports (model.selection),
    computed periodically by the measure's population owner (compacted topic, key
    = measure). Advisory: the pipeline keeps scoring with ``current_structure``;
    an operator decides whether to change it."""

    measure: str
    current_structure: str = Field(description="the structure the pipeline scores with")
    choice: str = Field(
        description="partial pooling unless another structure beats it by more than "
        "2 standard errors of the paired difference (model.selection.choose)"
    )
    best: str = Field(description="the structure with the highest elpd")
    structures: list[StructureScore] = Field(description="best first")
    num_patients: int
    num_cohorts: int
    num_folds: int
    seed: int
    svi_steps: int = Field(description="SVI steps of every fold's fit")
    skipped_attributes: list[str] = Field(
        default_factory=list,
        description="cohort attributes with a single level (no cohort level to compare)",
    )
    posterior_version: int = Field(
        description="the latest population posterior version when the statistics were taken"
    )
    evidence_digest: str = Field(
        description="digest of the patients' statistics compared (as PopulationPosterior's)"
    )
    seconds: float = Field(
        description="compute time of the selection's fits (waits for population updates excluded)"
    )


#: The schema of every topic's values, for ``efficacy schemas``.
TOPIC_SCHEMAS: dict[str, object] = {
    "enrollments": EnrollmentEvent,
    "wearables": WearableReading,
    "labs": LabResult,
    "pros": PatientReportedOutcome,
    "deadletter": DeadLetter,
    "population-evidence": EvidenceBatch,
    "population-posterior": PopulationPosterior,
    "scores": EfficacyScore,
    "alerts": Alert,
    "structure-selection": StructureSelection,
}


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every topic's values, by topic name."""
    return {
        topic: TypeAdapter(schema).json_schema(mode="serialization")
        for topic, schema in TOPIC_SCHEMAS.items()
    }
