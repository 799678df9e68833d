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
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
)
from pydantic_core import to_json

if TYPE_CHECKING:
    from streams.catalogue import Catalogue

SCHEMA_VERSION = 1
MAX_EVENT_ID = 128


def utc_now() -> datetime:
    return datetime.now(UTC)


M = TypeVar("M", bound=BaseModel)
_TRUSTED: dict[type, tuple[tuple[str, ...], dict[str, object], dict[str, object]] | None] = {}


def trusted(cls: type[M], **values: object) -> M:
    """``cls.model_construct(**values)`` for values passed by field name and
    computed with each field's type (no validation), in about half its time:
    the same field values (defaults and default factories for fields not
    given) and ``model_fields_set``. For models without aliases, extras or
    post-init hooks (checked on first use; any other model goes to
    ``model_construct``). Per patient and batch, ``model_construct`` cost more
    than the mixture summaries."""
    try:
        spec = _TRUSTED[cls]
    except KeyError:
        spec = _TRUSTED[cls] = _trusted_spec(cls)
    if spec is None:
        return cls.model_construct(**values)
    names, defaults, factories = spec
    fields_set = set(values)
    if tuple(values) != names:  # serialisation follows the order of __dict__
        values = {
            name: values[name]
            if name in values
            else defaults[name]
            if name in defaults
            else factories[name]()  # type: ignore[operator]
            for name in names
        }
    m = _new(cls)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", fields_set)
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


# object's own, looked up once: ``cls.__new__`` and ``object.__setattr__`` are
# attribute look-ups through the class hierarchy on every call (a fifth of
# ``trusted``); _trusted_spec refuses a model with its own ``__new__``.
_new = object.__new__
_set = object.__setattr__


def _trusted_spec(
    cls: type[BaseModel],
) -> tuple[tuple[str, ...], dict[str, object], dict[str, object]] | None:
    """Field names, plain defaults and default factories of ``cls``, or None when
    ``trusted`` cannot stand in for ``model_construct``."""
    if (
        cls.__pydantic_post_init__
        or cls.__pydantic_root_model__
        or cls.model_config.get("extra") == "allow"
        or cls.__private_attributes__
        or cls.__new__ is not object.__new__
    ):
        return None
    defaults: dict[str, object] = {}
    factories: dict[str, object] = {}
    for name, field in cls.__pydantic_fields__.items():
        if field.alias not in (None, name) or field.validation_alias not in (None, name):
            return None
        if field.default_factory is not None:
            if field.default_factory_takes_validated_data:
                return None
            factories[name] = field.default_factory
        elif not field.is_required():
            defaults[name] = field.default
    return tuple(cls.__pydantic_fields__), defaults, factories


class Envelope(BaseModel):
    """Fields every message carries. Times must carry a timezone (ISO 8601)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="version of the message layout (1)"
    )
    event_id: str = Field(
        min_length=1,
        max_length=MAX_EVENT_ID,
        description="unique id of the event: a record with an id already seen is a "
        "duplicate and dropped",
    )
    event_time: AwareDatetime = Field(
        description="when it happened (not when it was sent), ISO 8601 with a time zone"
    )


PatientId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[^\s/]+$",
        description="the patient's pseudonymous id (no spaces or slashes); the record key",
    ),
]


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
    ``exposed`` says whether the intervention starts at enrolment. ``covariates``
    (layout version 2; version 1 messages, without them, are still accepted) are
    the patient's baseline characteristics by the catalogue's covariate names."""

    schema_version: Literal[1, 2] = Field(
        default=2, description="version of the message layout (2 adds covariates; 1 accepted)"
    )
    kind: Literal["enrollment"] = Field(default="enrollment", description="an enrolment")
    patient_id: PatientId
    cohort: str = Field(
        min_length=1,
        max_length=128,
        description="the level of partial pooling: clinic, cohort or stratum",
    )
    arm: str = Field(
        default="intervention", min_length=1, max_length=64, description="the trial arm"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="free cohort attributes, name to value"
    )
    exposed: bool = Field(
        default=False, description="whether the intervention (exposure 1) starts at enrolment"
    )
    covariates: dict[Annotated[str, Field(max_length=64)], float | str] = Field(
        default_factory=dict,
        max_length=64,
        description="baseline characteristics by the catalogue's covariate names: a number "
        "(in the covariate's unit) or a categorical level",
    )


class ExposureChange(Envelope):
    """The intervention starts (``exposure`` > 0, a dose; 1 for on/off) or stops
    (``exposure`` = 0) at ``event_time``: crossover and withdrawal."""

    kind: Literal["exposure"] = Field(default="exposure", description="an exposure change")
    patient_id: PatientId
    exposure: float = Field(
        ge=0.0,
        le=1e6,
        description="the exposure from event_time on: a dose (1 for on/off), 0 stops it",
    )


#: The value of an enrollments record: either kind, told apart by ``kind``.
EnrollmentEvent = Annotated[Enrollment | ExposureChange, Field(discriminator="kind")]
ENROLLMENT_EVENT = TypeAdapter(EnrollmentEvent)


# --- raw observations (topics: wearables, labs, pros) ----------------------------


class RawObservation(Envelope):
    """A reading from a producer: wearable, lab or patient-reported outcome."""

    patient_id: PatientId
    measure: str = Field(
        min_length=1,
        max_length=64,
        description="a measure of the measure catalogue (streams/measures.toml or "
        "EFFICACY_MEASURES_FILE) that this source may carry",
    )
    value: float = Field(description="the reading, in ``unit``")
    unit: str = Field(
        min_length=1,
        max_length=32,
        description="the measure's canonical unit, one of its other units (converted on "
        "arrival) or a UCUM spelling of either that the catalogue lists",
    )
    adherence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="the fraction of the prescribed dose taken for this reading (null: all "
        "of it); the reading's exposure is the dose in force times this",
    )
    covariates: dict[Annotated[str, Field(max_length=64)], float] = Field(
        default_factory=dict,
        max_length=64,
        description='time-varying covariates the catalogue declares (varies = "reading"), '
        "by name, in their units",
    )


class WearableReading(RawObservation):
    """A reading from a wearable device (topic wearables)."""

    source: Literal["wearable"] = Field(default="wearable", description="a wearable")
    device: str | None = Field(default=None, description="the device, free text")


class LabResult(RawObservation):
    """A laboratory result (topic labs)."""

    source: Literal["lab"] = Field(default="lab", description="a laboratory")
    laboratory: str | None = Field(default=None, description="the laboratory, free text")


class PatientReportedOutcome(RawObservation):
    """A patient-reported outcome (topic pros)."""

    source: Literal["pro"] = Field(default="pro", description="a patient-reported outcome")
    instrument: str | None = Field(default=None, description="the app or questionnaire, free text")


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
    adherence: float = 1.0
    # The measure's time covariates (MeasureSpec.time_covariate_row): the
    # catalogue's reading covariates in its order, then the daily cycle's terms.
    time_covariates: list[float] = Field(default_factory=list)


class EnrollmentRecord(BaseModel):
    """A validated enrolment or exposure event with its origin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["enrollment_record"] = "enrollment_record"
    event: EnrollmentEvent
    origin: Origin
    covariates: list[float] | None = Field(
        default=None,
        description="an enrolment's covariate design row (model.covariates), natural units",
    )

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

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="version of the message layout (1)"
    )
    reason: str = Field(
        description="why, as a short code (unknown_measure, invalid_schema, duplicate, ...: "
        "docs/ingest.md)"
    )
    detail: str = Field(description="what was wrong, in words")
    source_topic: str = Field(description="the topic the raw record was read from")
    partition: int = Field(description="its partition")
    offset: int = Field(description="its offset")
    key_b64: str | None = Field(description="its key, base64 (null: no key)")
    value_b64: str = Field(description="its value as the producer sent it, base64")
    rejected_at: datetime = Field(
        default_factory=utc_now, description="when the worker rejected it"
    )


# --- internal: patient statistics for the population agent -----------------------


class PatientEvidence(BaseModel):
    """The latest sufficient statistics of one patient for one measure (not a
    delta: last write wins, so a replay is harmless). Standardised units."""

    # Statistics as bytes are float64 values, little-endian, row-major: base64
    # in JSON (what the worker writes: parsing and writing 32 decimal floats an
    # item was most of the population agent's work on it).
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="version of the message layout (1)"
    )
    measure: str = Field(description="the measure")
    patient_id: PatientId
    cohort: str = Field(description="the patient's cohort")
    gram: list[list[float]] | list[float] | bytes = Field(
        description="sufficient statistics: the Gram matrix of the design columns and the "
        "outcome, standardised, under the long forgetting; for a Bernoulli or Poisson "
        "measure its five cell statistics (n_0, s_0, n_1, s_1, k: model.families). As "
        "numbers, or as a string: their float64 values, little-endian, row-major, in "
        "URL-safe base64 (what the worker writes)"
    )
    reference_time: float = Field(
        description="the time (standardised) the forgetting weights are relative to"
    )
    count_exposed: int = Field(description="readings with exposure > 0")
    count_unexposed: int = Field(description="readings without exposure")
    covariates: list[float] = Field(
        default_factory=list,
        description="the patient's covariate design row (natural units; empty without "
        "covariates in the catalogue)",
    )
    groups: dict[str, str] = Field(
        default_factory=dict,
        description="the patient's group at each further grouping level of the measure "
        "(its enrolment's attribute of that name); a level left out: the attribute was "
        'missing, and the patient sits in the level\'s group "" (MISSING_GROUP)',
    )
    recent_gram: list[list[float]] | bytes | None = Field(
        default=None,
        description="the statistics under the recent-window forgetting (fast half-life), at "
        "the same reference time, written as ``gram``; drift monitoring fits them against "
        "the all-time ones",
    )


#: The group of a patient whose enrolment lacks a grouping level's attribute:
#: one group per level (no valid value is empty), learned like any other.
MISSING_GROUP = ""


class EvidenceBatch(BaseModel):
    """The statistics of the patients of one measure that one batch of the
    patients agent changed: one message instead of one per patient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="version of the message layout (1)"
    )
    measure: str = Field(description="the measure of every item")
    items: list[PatientEvidence] = Field(description="one per patient the batch changed")


def evidence_batch_json(measure: str, items: list[dict[str, object]]) -> bytes:
    """``json_bytes(EvidenceBatch(measure=measure, items=[PatientEvidence(**i)
    for i in items]))``, the same bytes, without the models: ``items`` hold
    every PatientEvidence field, by name in its order, with its type (as
    streams.patient_state.evidence_fields gives them), serialised by
    pydantic's own serialiser with the models' settings (bytes as URL-safe
    base64, non-finite numbers as null; tests/test_json_bytes.py checks it)."""
    return to_json(
        {"schema_version": SCHEMA_VERSION, "measure": measure, "items": items},
        bytes_mode="base64",
        inf_nan_mode="null",
    )


# --- outputs --------------------------------------------------------------------


class Interval(BaseModel):
    """A posterior summary: mean, sd and a credible interval (90% unless a
    ``level`` next to it says otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = Field(description="posterior mean")
    sd: float = Field(description="posterior standard deviation")
    lower: float = Field(description="lower end of the credible interval")
    upper: float = Field(description="upper end of the credible interval")


class MeasureScore(BaseModel):
    """One measure's posterior of the patient's individual treatment effect, in
    the measure's unit per unit of exposure, with the decision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: str = Field(description="the measure")
    unit: str = Field(description="the measure's canonical unit")
    direction: Literal["higher", "lower"] = Field(
        description="which direction of the measure is a benefit"
    )
    mcid: float = Field(description="minimal clinically important difference, in ``unit``")
    effect: Interval = Field(
        description="posterior of the patient's treatment effect, ``unit`` per unit of exposure"
    )
    level: float = Field(default=0.9, description="credible level of ``effect``'s interval")
    p_benefit_ge_mcid: float = Field(
        description="posterior probability of a benefit of at least the MCID"
    )
    p_benefit_gt_0: float = Field(description="posterior probability of any benefit")
    classification: Literal["responder", "non_responder", "uncertain", "insufficient_data"] = Field(
        description="the decision rule's call"
    )
    recommended_action: str | None = Field(
        default=None, description="the care pathway's action for the call, if any"
    )
    population_effect: float = Field(
        description="the population part of the effect's mean (mean = population + cohort "
        "+ individual)"
    )
    cohort_deviation: float | None = Field(
        description="the cohort's part of the effect's mean; null for a binary or count "
        "measure scored on a ratio or difference scale (the parts add up on the link scale only)"
    )
    individual_deviation: float | None = Field(
        description="the patient's own part of the effect's mean; null as cohort_deviation"
    )
    effect_scale: str | None = Field(
        default=None,
        description="the scale of ``effect`` and ``mcid`` of a binary or count measure "
        "(odds_ratio, risk_difference, log_odds_ratio, rate_ratio, rate_difference, "
        "log_rate_ratio: model.family_scores); null for a Gaussian measure (``unit`` per unit "
        "of exposure)",
    )
    shrinkage: float = Field(
        description="weight of the pooled prior against the patient's own data, 0 to 1"
    )
    count_exposed: int = Field(description="readings with exposure > 0")
    count_unexposed: int = Field(description="readings without exposure")
    last_event_time: datetime | None = Field(description="time of the latest reading")
    population_version: int = Field(
        description="version of the population posterior the score was computed under"
    )


class CompositeScore(BaseModel):
    """Weighted mean over measures of the benefit in MCID units,
    Σ w_m sign_m b_m / MCID_m / Σ w_m (measures treated as independent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benefit_in_mcid: Interval = Field(description="the weighted benefit, in MCID units")
    measures: list[str] = Field(description="the measures it combines")


class EfficacyScore(Envelope):
    """A patient's living efficacy score: every measure scored so far."""

    patient_id: PatientId
    cohort: str = Field(description="the patient's cohort")
    score_version: int = Field(description="increases with every new score of the patient")
    decision_rule_version: str = Field(description="version of the decision rule applied")
    measures: list[MeasureScore] = Field(description="one per measure scored so far")
    composite: CompositeScore | None = Field(
        default=None, description="the weighted benefit over measures (with two or more)"
    )
    joint: list[JointScore] = Field(
        default_factory=list,
        description="the patient's scores under each joint group (catalogue [joint.<group>]) "
        "with a posterior that the patient has evidence of; empty without",
    )


class Coefficient(BaseModel):
    """One covariate design column's coefficients, natural units: ``effect`` is
    the change of a patient's expected effect (per unit exposure) per unit of the
    covariate (or for the level against the reference), the effect modifier;
    ``intercept`` the change of the patient's expected baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    covariate: str = Field(description="the design column: a covariate or covariate=level")
    effect: Interval = Field(description="effect modifier, outcome unit per exposure per unit")
    intercept: Interval = Field(description="shift of the baseline, outcome unit per unit")


class CurveBand(BaseModel):
    """A fitted curve's posterior over its grid, pointwise: the mean and the 90%
    band (5% and 95% quantiles)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float] = Field(description="posterior mean at each grid point")
    q05: list[float] = Field(description="5% quantile at each grid point")
    q95: list[float] = Field(description="95% quantile at each grid point")


class SmoothCurve(BaseModel):
    """A smooth covariate's curves (catalogue ``smooth``; model.smooth), as
    ``efficacy fit --smooth`` writes them in its JSON's ``curves``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    covariate: str = Field(description="the smooth covariate")
    grid: list[float] = Field(
        description="41 covariate values (its unit) across the spline's boundary: the "
        "plausible range cut to 3 scales either side of the typical value"
    )
    effect: CurveBand = Field(
        description="the expected effect of a patient of that value, per unit exposure (the "
        "population effect plus the modifier; other covariates at their typical values)"
    )
    intercept_shift: CurveBand = Field(
        description="the shift of that patient's expected baseline against a patient at the "
        "typical value, outcome unit"
    )


class DailyCycle(CurveBand):
    """The outcome's daily cycle (catalogue ``daily_cycle``), as ``efficacy fit
    --daily-cycle`` writes it in its JSON's ``daily_cycle``: the shift of a
    reading at each hour of its own clock from the day's mean, outcome unit."""

    hour: list[float] = Field(description="41 hours of day from 0 to 24")


class PopulationPosterior(Envelope):
    """Versioned population posterior of one measure (compacted topic, key =
    measure). ``draws`` are fixed draws of θ (standardised units) that define
    every patient's mixture posterior; ``cohort_mean``/``cohort_var`` (S, G) the
    posterior of each cohort's effect deviation under each draw. With further
    grouping levels (``group_levels``) the groups' deviations are correlated
    given θ: ``group_mean``/``group_var`` hold each further level's groups'
    moments and ``group_cross_cov`` the covariances between the groups of two
    levels, all a patient's total shift needs (model.scores.LevelPosteriors)."""

    measure: str = Field(description="the measure")
    version: int = Field(description="increases with every posterior of the measure")
    num_patients: int = Field(description="patients in the fit")
    num_observations: float = Field(description="readings in the fit (weighted by the forgetting)")
    elbo: float = Field(description="the fit's evidence lower bound")
    svi_steps: int = Field(description="SVI steps of the fit")
    converged: bool = Field(description="whether the ELBO settled")
    standardization: dict[str, float | list[float]] = Field(
        description=(
            "the fixed standardisation of outcome, exposure, time and covariates "
            "(model.config.Standardization; covariate locations and scales are lists)"
        )
    )
    draws: dict[str, list] = Field(
        description="fixed draws of the hyperparameters θ by name, standardised units"
    )
    cohorts: list[str] = Field(description="the cohorts, in the order of cohort_mean's columns")
    cohort_mean: list[list[float]] = Field(
        description="posterior mean of each cohort's effect deviation under each draw (S, G)"
    )
    cohort_var: list[list[float]] = Field(
        description="posterior variance of each cohort's effect deviation under each draw (S, G)"
    )
    group_levels: list[str] = Field(
        default_factory=list,
        description="the further grouping levels (enrolment attributes), in the order of "
        "groups, group_mean's blocks and tau_groups' columns; empty: the cohorts only",
    )
    groups: list[list[str]] = Field(
        default_factory=list,
        description='each further level\'s groups ("": the patients whose enrolment lacks '
        "the attribute)",
    )
    group_mean: list[list[float]] = Field(
        default_factory=list,
        description="posterior mean of each further level's groups' effect deviations under "
        "each draw (S, G'), the levels' groups one after the other",
    )
    group_var: list[list[float]] = Field(
        default_factory=list,
        description="their posterior variance under each draw (S, G')",
    )
    group_cross_cov: list[list[list[list[float]]]] = Field(
        default_factory=list,
        description="posterior covariances between the groups of two levels under each draw, "
        "one (S, G_l, G_m) block per pair of levels l < m (level 0 the cohorts, then "
        "group_levels), pairs in the order (0, 1), (0, 2), ..., (1, 2), ...",
    )
    summary: dict[str, Interval] = Field(
        description="population quantities in raw units: effect, intercept, sigma, "
        "effect_sd_patients, effect_sd_cohorts, time_trend (90% intervals), and "
        "effect_sd_<level> of each further grouping level"
    )
    coefficients: list[Coefficient] = Field(
        default_factory=list,
        description="each patient covariate's coefficients (effect modifier and intercept "
        "shift), natural units, 90% intervals; empty without covariates",
    )
    curves: list[SmoothCurve] = Field(
        default_factory=list,
        description="each smooth covariate's expected effect and baseline shift over its "
        "range with 90% bands (catalogue smooth; model.smooth.curve_summaries); empty without",
    )
    daily_cycle: DailyCycle | None = Field(
        default=None,
        description="the outcome's daily cycle over the hours with its 90% band (catalogue "
        "daily_cycle); null without",
    )
    unconstrained_loc: list[float] = Field(
        description="the variational posterior's location (unconstrained θ)"
    )
    unconstrained_scale_tril: list[list[float]] = Field(
        description="the variational posterior's scale (Cholesky factor)"
    )
    drift: dict[str, float] = Field(
        default_factory=dict,
        description="movement since the reference posterior (monitoring.drift): kl, "
        "kl_location, shift, shift_z; with a recent-window fit also window_shift, "
        "recent_effect_mean and recent_effect_sd",
    )
    drift_detected: bool = Field(
        default=False, description="a drift detector fired on this version"
    )
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


class JointPosterior(Envelope):
    """Versioned posterior of one joint group (catalogue ``[joint.<group>]``,
    model.joint) on the population-posterior topic, key ``joint:<group>`` (a
    measure's posterior is keyed by the measure; ``kind`` tells them apart).
    ``draws`` are fixed draws of the joint model's θ (model.joint.JointHyper,
    standardised units, each measure by its own standardisation) that define
    every patient's joint scores, with a cohort level together with each
    draw's posterior of every cohort's u_g (``cohort_mean``, ``cohort_cov``): a
    patient of a cohort the posterior does not know gets u_g's prior."""

    kind: Literal["joint"] = Field(default="joint", description='"joint": a joint group\'s')
    group: str = Field(description="the joint group")
    version: int = Field(description="increases with every posterior of the group")
    measures: list[str] = Field(description="the group's measures, in the order of the draws")
    num_patients: int = Field(description="patients with evidence of any of the measures")
    num_observations: list[float] = Field(description="readings in the fit, per measure")
    elbo: float = Field(description="the fit's evidence lower bound")
    svi_steps: int = Field(description="SVI steps of the fit")
    converged: bool = Field(description="whether the ELBO settled")
    standardization: list[dict[str, float | list[float]]] = Field(
        description="each measure's standardisation (model.config.Standardization)"
    )
    draws: dict[str, list] = Field(
        description="fixed draws of θ by name (mu (S, M, 2), tau (S, 2M), corr_chol "
        "(S, 2M, 2M), sigma (S, M), gamma (S, M, d), tau_cohort (S, M): zeros without a "
        "cohort level, absent from older posteriors), standardised units"
    )
    effect_correlation: dict[str, list[list[float]]] = Field(
        description="posterior of the between-measure correlation of the patients' effects "
        "(M, M): mean, sd, q05, q95 (model.joint.describe_correlation)"
    )
    effect_factor: dict[str, dict[str, list[float] | float]] = Field(
        default_factory=dict,
        description="posterior of the common factor of the patients' benefits "
        "(model.joint.common_factor): loadings (M,) (each measure's standardised "
        "benefit's correlation with the factor) and variance_share (the part of the "
        "benefits' between-patient variance it explains), each mean, sd, q05, q95; "
        "empty in posteriors published before it",
    )
    summary: dict[str, Interval] = Field(
        description="per measure, raw units per unit of exposure, 90% intervals: "
        "effect_<measure> (population mean effect) and effect_sd_patients_<measure> "
        "(between-patient sd of the effect)"
    )
    unconstrained_loc: list[float] = Field(
        description="the variational posterior's location (unconstrained θ)"
    )
    unconstrained_scale_tril: list[list[float]] = Field(
        description="the variational posterior's scale (Cholesky factor)"
    )
    evidence_digest: str = Field(
        default="", description="digest of the statistics this version was fitted on"
    )
    cohorts: list[str] = Field(
        default_factory=list,
        description="the cohorts, in the order of cohort_mean's and cohort_cov's axis G "
        "(empty without a cohort level)",
    )
    cohort_mean: list = Field(
        default_factory=list,
        description="(S, G, M) each draw's posterior mean of every cohort's shift u_g of the "
        "measures' effects given θ and all the group's evidence (model.joint."
        "cohort_posteriors), standardised units",
    )
    cohort_cov: list = Field(
        default_factory=list,
        description="(S, G, M, M) the same posterior's covariance",
    )


class JointEffect(BaseModel):
    """One measure's individual effect under a joint group's model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: str = Field(description="the measure")
    unit: str = Field(description="the measure's canonical unit")
    direction: Literal["higher", "lower"] = Field(description="which direction is a benefit")
    mcid: float = Field(description="minimal clinically important difference, in ``unit``")
    effect: Interval = Field(
        description="posterior of the patient's effect, ``unit`` per unit of exposure, "
        "borrowing strength from the group's other measures"
    )
    p_benefit_ge_mcid: float = Field(
        description="posterior probability of a benefit of at least the MCID, under the joint model"
    )
    p_benefit_gt_0: float = Field(description="posterior probability of any benefit")
    classification: Literal["responder", "non_responder", "uncertain", "insufficient_data"] = Field(
        description="the decision rule's call on the joint posterior (the measure's own call "
        "is in ``measures``)"
    )
    recommended_action: str | None = Field(
        default=None, description="the care pathway's action for the call, if any"
    )


class JointScore(BaseModel):
    """A patient's scores under one joint group's posterior (model.joint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str = Field(description="the joint group")
    effects: list[JointEffect] = Field(description="one per measure of the group")
    responsiveness: Interval = Field(
        description="the latent responsiveness: the patient's benefit deviation from the "
        "population averaged over the measures, each in units of its between-patient sd "
        "(0: the typical patient)"
    )
    p_above_population: float = Field(
        description="posterior probability that responsiveness > 0 (responds more than the "
        "population)"
    )
    level: float = Field(default=0.9, description="credible level of the intervals")
    population_version: int = Field(description="version of the joint posterior")


def _posterior_kind(value: object) -> str:
    """A posterior record's kind: ``joint`` (JointPosterior) or ``measure``."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind or "measure"


#: The value of a population-posterior record: a measure's (key: the measure) or
#: a joint group's (key ``joint:<group>``, ``kind`` "joint").
PosteriorRecord = Annotated[
    Annotated[PopulationPosterior, Tag("measure")] | Annotated[JointPosterior, Tag("joint")],
    Discriminator(_posterior_kind),
]
POSTERIOR_RECORD = TypeAdapter(PosteriorRecord)


class SubgroupScore(Envelope):
    """The efficacy of one declared subgroup for one measure (compacted topic
    subgroup-scores, key ``measure:subgroup``): the posterior of the mean effect
    over the subgroup's patients (model.subgroups), its probability of a
    clinically meaningful benefit and the call. Published when it changes
    materially."""

    measure: str = Field(description="the measure")
    subgroup: str = Field(description="the subgroup's name in the catalogue")
    description: str = Field(default="", description="the subgroup, in words")
    members: int = Field(description="patients of the measure in the subgroup")
    unit: str = Field(description="the measure's unit")
    mcid: float = Field(description="minimal clinically important difference, measure's unit")
    effect: Interval = Field(description="the subgroup's mean effect, per unit of exposure")
    level: float = Field(default=0.9, description="the credible interval's level")
    p_benefit_ge_mcid: float = Field(description="P(mean benefit ≥ MCID)")
    p_benefit_gt_0: float = Field(description="P(mean benefit > 0)")
    call: Literal["works", "does_not_work", "uncertain", "insufficient_data"] = Field(
        description="works: P(mean benefit ≥ MCID) ≥ 0.8; does_not_work: ≤ 0.2 (with the "
        "patient rule's hysteresis); insufficient_data: too few patients"
    )
    population_version: int = Field(description="the population posterior it comes from")


class Alert(Envelope):
    """A responder transition with its recommended action, a drift alert
    (posterior shift or recent-window departure, ``statistics`` says which), or
    a prior-data conflict (incoming readings keep falling outside their
    posterior predictive; per measure, never per patient)."""

    kind: Literal["transition", "drift", "prior_data_conflict", "subgroup_call"] = Field(
        description="a responder transition, a drift of the population posterior, a "
        "prior-data conflict, or a subgroup's call that changed"
    )
    severity: Literal["info", "warning", "critical"] = Field(
        default="info", description="how urgent"
    )
    patient_id: PatientId | None = Field(
        default=None, description="the patient of a transition (null for the others)"
    )
    measure: str = Field(description="the measure")
    message: str = Field(description="what happened, in words")
    previous: str | None = Field(
        default=None, description="a transition's (or a subgroup's) previous call"
    )
    current: str | None = Field(
        default=None, description="a transition's (or a subgroup's) new call"
    )
    subgroup: str | None = Field(default=None, description="the subgroup of a subgroup_call")
    recommended_action: str | None = Field(
        default=None, description="the care pathway's action for the new call, if any"
    )
    population_version: int | None = Field(
        default=None, description="the population posterior version concerned"
    )
    statistics: dict[str, float] = Field(
        default_factory=dict, description="the detector's statistics (drift, conflicts)"
    )


class StructureScore(BaseModel):
    """One candidate structure's cross-validated predictive density (raw outcome,
    summed over held-out patients) and its difference to the best structure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    structure: str = Field(
        description="complete, none, partial, partial+<level> (cohort or a further grouping "
        "level), partial+<level>+<level>... (several levels, the first one the cohort level), "
        "and with covariates partial+x:<covariate>..."
    )
    elpd: float = Field(description="total elpd over held-out patients")
    elpd_se: float = Field(description="standard error of elpd, sqrt(n var(elpd_i))")
    elpd_diff: float = Field(description="elpd minus the best structure's elpd (<= 0)")
    diff_se: float = Field(description="standard error of elpd_diff, sqrt(n var(d_i))")


class StructureSelection(Envelope):
    """Which pooling structure one measure's evidence supports (model.selection),
    computed periodically by the measure's population owner (compacted topic, key
    = measure). Advisory: the pipeline keeps scoring with ``current_structure``;
    an operator decides whether to change it."""

    measure: str = Field(description="the measure")
    current_structure: str = Field(description="the structure the pipeline scores with")
    choice: str = Field(
        description="partial pooling unless another structure beats it by more than "
        "2 standard errors of the paired difference (model.selection.choose)"
    )
    best: str = Field(description="the structure with the highest elpd")
    structures: list[StructureScore] = Field(description="best first")
    num_patients: int = Field(description="patients compared")
    num_cohorts: int = Field(description="cohorts among them")
    num_folds: int = Field(description="folds of the cross-validation")
    seed: int = Field(description="seed of the folds and fits")
    svi_steps: int = Field(description="SVI steps of every fold's fit")
    skipped_attributes: list[str] = Field(
        default_factory=list,
        description="grouping levels (cohort, or a further one) with a single group among the "
        "patients: no level to compare",
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


class LookupAudit(Envelope):
    """One request to the score lookup (streams.score_lookup), allowed or refused,
    as the worker that received it answered it: who asked (never the credential),
    for which patient, when, and the outcome. A forwarded lookup leaves one record
    at the worker that forwarded it and one at the owner, with the same
    ``request_id``."""

    kind: Literal["score_lookup"] = Field(default="score_lookup", description="what was audited")
    request_id: str = Field(
        min_length=1, max_length=64, description="the lookup's id, the same on every worker"
    )
    patient_id: str = Field(
        max_length=1024, description="the patient id asked for, as asked (known or not)"
    )
    outcome: Literal["allowed", "no_credential", "wrong_credential", "disabled"] = Field(
        description="allowed (a valid token), or refused: no credential, a wrong one, or no "
        "token configured on this worker (the lookup is disabled)"
    )
    status: int = Field(description="the HTTP status this worker answered")
    who: str | None = Field(
        default=None,
        description="the credential's identity, ``token:sha256:<first 16 hex digits of the "
        "token's SHA-256>`` (null when refused: a wrong credential is not recorded)",
    )
    client: str | None = Field(
        default=None, description="the peer address of the request (a worker when forwarded)"
    )
    forwarded_by: str | None = Field(
        default=None, description="the worker that forwarded the request, as it said"
    )
    forwarded_to: str | None = Field(
        default=None, description="the owner this worker forwarded the request to"
    )
    worker: str = Field(description="the canonical URL of the worker that wrote this record")


#: The schema of every topic's values, for ``efficacy schemas``.
TOPIC_SCHEMAS: dict[str, object] = {
    "enrollments": EnrollmentEvent,
    "wearables": WearableReading,
    "labs": LabResult,
    "pros": PatientReportedOutcome,
    "deadletter": DeadLetter,
    "population-evidence": EvidenceBatch,
    "population-posterior": PosteriorRecord,
    "scores": EfficacyScore,
    "alerts": Alert,
    "structure-selection": StructureSelection,
    "audit": LookupAudit,
    "subgroup-scores": SubgroupScore,
}


#: Where the exported schemas say they come from: ``$id`` is ``SCHEMA_ID.format(topic=...)``.
SCHEMA_ID = "urn:living-efficacy:schema:{topic}:v1"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
EXAMPLES_FILE = Path(__file__).with_name("schema_examples.json")
SOURCE_OF_TOPIC = {"wearables": "wearable", "labs": "lab", "pros": "pro"}


def json_schemas(catalogue: Catalogue | None = None) -> dict[str, dict]:
    """JSON Schema of every topic's values, by topic name: the pydantic models'
    schemas with ``$id``, the catalogue's measure names and units as enums
    (``catalogue``, default the shipped one) and examples
    (``schema_examples.json``)."""
    from streams.catalogue import Catalogue

    catalogue = catalogue or Catalogue.load()
    examples = json.loads(EXAMPLES_FILE.read_text())
    schemas = {}
    for topic, model in TOPIC_SCHEMAS.items():
        schema = TypeAdapter(model).json_schema(mode="serialization")
        _constrain_measures(schema, catalogue, SOURCE_OF_TOPIC.get(topic))
        schemas[topic] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": SCHEMA_ID.format(topic=topic),
            **schema,
            "examples": examples[topic],
        }
    return schemas


def _constrain_measures(schema: dict, catalogue: Catalogue, source: str | None) -> None:
    """Enums of measure names and units wherever a schema (or one of its
    ``$defs``) has them. A reading (``source``) takes the measures of that
    source and each measure's accepted units (canonical, alternatives, UCUM
    spellings; ``allOf`` ties the unit to the measure); outputs carry canonical
    units."""
    specs = [
        spec for spec in catalogue.measures.values() if source is None or source in spec.sources
    ]
    names = [spec.name for spec in specs]
    for node in [schema, *schema.get("$defs", {}).values()]:
        properties = node.get("properties", {})
        if "measure" in properties and properties["measure"].get("type") == "string":
            properties["measure"]["enum"] = names
        if properties.get("measures", {}).get("items", {}).get("type") == "string":
            properties["measures"]["items"]["enum"] = names
        if "unit" in properties and "measure" in properties:
            if source is None:
                properties["unit"]["enum"] = sorted({spec.unit for spec in specs})
                continue
            accepted = {spec.name: [spec.unit, *spec.units, *spec.ucum] for spec in specs}
            properties["unit"]["enum"] = sorted({u for units in accepted.values() for u in units})
            node["allOf"] = [
                {
                    "if": {"properties": {"measure": {"const": name}}, "required": ["measure"]},
                    "then": {"properties": {"unit": {"enum": units}}},
                }
                for name, units in accepted.items()
            ]


def json_bytes(model: BaseModel) -> bytes:
    """``model.model_dump_json().encode()``, the same bytes, from the model's
    serialiser directly: without the str round trip and the keyword handling,
    a third cheaper for a patient record (the worker writes one per patient it
    touches)."""
    return model.__pydantic_serializer__.to_json(model)
