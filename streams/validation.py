"""Validation of raw records: schema, key, time bounds, known measure and unit,
conversion to the measure's canonical unit, plausibility.

The patients agent (streams.agents.patients) consumes the raw topics itself and
calls ``validate_record`` on every record: a valid one becomes an Observation or
EnrollmentRecord with its origin (topic, partition, offset, timestamp), a bad
one raises Rejected with a reason, and the agent dead-letters it with its
original bytes. Duplicates by event id are recognised where the patient's
state lives (streams.patient_state). Pure: no Kafka here.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from model.covariates import CovariateError, encode_patient
from streams.catalogue import Catalogue, UnknownMeasure, UnknownUnit
from streams.schemas import (
    ENROLLMENT_EVENT,
    DeadLetter,
    Enrollment,
    EnrollmentRecord,
    LabResult,
    Observation,
    Origin,
    PatientReportedOutcome,
    RawObservation,
    WearableReading,
    trusted,
)
from streams.settings import Settings

SCHEMA_OF_SOURCE: dict[str, type[RawObservation]] = {
    "wearables": WearableReading,
    "labs": LabResult,
    "pros": PatientReportedOutcome,
}
MAX_RECORD_BYTES = 64 * 1024


class Rejected(Exception):
    """A record that cannot be accepted: ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _validate(parse: Callable[[bytes], object], value: bytes):
    try:
        return parse(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        reason = "malformed_json" if first.get("type") == "json_invalid" else "invalid_schema"
        raise Rejected(reason, f"{where}: {first.get('msg')}") from None


def _check_envelope(key: bytes | None, patient_id: str, event_time: datetime, now: datetime,
                    settings: Settings) -> None:  # fmt: skip
    if key is None or key.decode(errors="replace") != patient_id:
        raise Rejected("key_mismatch", "record key must be the patient_id")
    earliest, latest = _time_window(now, settings.max_age_days, settings.max_future_days)
    if event_time > latest:
        raise Rejected("future_time", f"event_time {event_time.isoformat()} is in the future")
    if event_time < earliest:
        raise Rejected("ancient_time", f"event_time {event_time.isoformat()} is too old")


@functools.lru_cache(maxsize=4)
def _time_window(
    now: datetime, max_age_days: float, max_future_days: float
) -> tuple[datetime, datetime]:
    """The event times accepted at ``now``: the same for every record of a
    step (``now`` is the step's), so computed once."""
    return now - timedelta(days=max_age_days), now + timedelta(days=max_future_days)


def _check_size(value: bytes | None) -> bytes:
    if value is None or not value:
        raise Rejected("empty", "record has no value")
    if len(value) > MAX_RECORD_BYTES:
        raise Rejected("oversized", f"{len(value)} bytes > {MAX_RECORD_BYTES}")
    return value


def validate_observation(
    source: str,
    key: bytes | None,
    value: bytes | None,
    origin: Origin,
    catalogue: Catalogue,
    settings: Settings,
    now: datetime | None = None,
) -> Observation:
    """A raw reading from source topic ``source`` as a validated Observation in
    its measure's canonical unit, or Rejected with the reason."""
    schema = SCHEMA_OF_SOURCE[source]
    record: RawObservation = _validate(schema.model_validate_json, _check_size(value))
    _check_envelope(key, record.patient_id, record.event_time, now or datetime.now(UTC), settings)
    try:
        spec = catalogue.get(record.measure)
    except UnknownMeasure:
        raise Rejected(
            "unknown_measure", f"measure {record.measure!r} is not in the catalogue"
        ) from None
    if record.source not in spec.sources:
        raise Rejected("wrong_source", f"{spec.name} is not accepted from {source}")
    try:
        canonical = spec.to_canonical(record.value, record.unit)
    except UnknownUnit as error:
        raise Rejected("unknown_unit", str(error)) from None
    not_of_family = spec.family_value(canonical)  # a count of -1 is not merely implausible
    if not_of_family is not None:
        raise Rejected("invalid_value", not_of_family)
    if not spec.plausible_value(canonical):
        low, high = spec.plausible
        raise Rejected(
            "implausible_value",
            f"{spec.name} = {canonical:g} {spec.unit} outside [{low:g}, {high:g}]",
        )
    try:
        time_covariates = encode_patient(catalogue.reading_covariates, record.covariates)
    except CovariateError as error:
        raise Rejected("invalid_covariate", str(error)) from None
    time_covariates = spec.time_covariate_row(time_covariates, record.event_time)
    # Built without validation: every field comes from the validated record,
    # the catalogue or the caller's Origin (a third of this function's time).
    return trusted(
        Observation,
        schema_version=record.schema_version,
        event_id=record.event_id,
        event_time=record.event_time,
        kind="observation",
        patient_id=record.patient_id,
        measure=spec.name,
        value=float(canonical),
        unit=spec.unit,
        source=record.source,
        origin=origin,
        adherence=1.0 if record.adherence is None else float(record.adherence),
        time_covariates=[float(c) for c in time_covariates],
    )


def validate_enrollment(
    key: bytes | None,
    value: bytes | None,
    origin: Origin,
    settings: Settings,
    now: datetime | None = None,
    catalogue: Catalogue | None = None,
) -> EnrollmentRecord:
    """An enrolment or exposure change, validated, with its origin; or Rejected.
    An enrolment's covariates are checked against the ``catalogue``'s covariate
    entries (``invalid_covariate``: missing, out of range, unknown level or name)
    and carried as their design row; the attributes that name grouping levels,
    by check_groups (``invalid_group``)."""
    event = _validate(ENROLLMENT_EVENT.validate_json, _check_size(value))
    _check_envelope(key, event.patient_id, event.event_time, now or datetime.now(UTC), settings)
    covariates = None
    if isinstance(event, Enrollment):
        specs = catalogue.patient_covariates if catalogue is not None else ()
        try:
            covariates = encode_patient(specs, event.covariates) if specs else None
        except CovariateError as error:
            raise Rejected("invalid_covariate", str(error)) from None
        if not specs and event.covariates:
            raise Rejected(
                "invalid_covariate",
                f"covariates {sorted(event.covariates)} sent, but the catalogue declares none",
            )
        if catalogue is not None:
            check_groups(event.attributes, catalogue.grouping_levels)
    return EnrollmentRecord(event=event, origin=origin, covariates=covariates)


MAX_GROUP_LENGTH = 128  # as a cohort label


def check_groups(attributes: dict[str, str], levels: tuple[str, ...]) -> None:
    """Rejected (``invalid_group``) when an enrolment attribute that names a
    grouping level of some measure (Catalogue.grouping_levels) has a value that
    cannot be a group: empty, longer than MAX_GROUP_LENGTH, with surrounding
    white space (a typo that would split a group in two) or a control character.
    A missing attribute is not an error: the patient is in the level's group ""
    (streams.schemas.MISSING_GROUP)."""
    for level in levels:
        value = attributes.get(level)
        if value is None:
            continue
        if not value or len(value) > MAX_GROUP_LENGTH:
            problem = f"must have 1 to {MAX_GROUP_LENGTH} characters"
        elif value != value.strip():
            problem = "has leading or trailing white space"
        elif not value.isprintable():
            problem = "has a control character"
        else:
            continue
        raise Rejected("invalid_group", f"grouping level {level!r}: {value[:64]!r} {problem}")


def validate_record(
    source: str,
    key: bytes | None,
    value: bytes | None,
    origin: Origin,
    catalogue: Catalogue,
    settings: Settings,
    now: datetime | None = None,
) -> Observation | EnrollmentRecord:
    """A raw record of source topic ``source`` (``enrollments`` or a key of
    SCHEMA_OF_SOURCE: streams.topics.Topics.raw without the prefix) as the
    validated event the patients agent applies; or Rejected."""
    if source == "enrollments":
        return validate_enrollment(key, value, origin, settings, now, catalogue)
    return validate_observation(source, key, value, origin, catalogue, settings, now)


def dead_letter(
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail=detail,
        source_topic=topic,
        partition=partition,
        offset=offset,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        value_b64=base64.b64encode(value or b"").decode(),
    )
