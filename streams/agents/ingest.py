"""ingest: validate raw records, normalise units, check plausibility, forward
them keyed by patient to the internal observations topic; dead-letter the rest.

A bad record never stops the stream and is never dropped silently: it goes to
the dead-letter topic with its original bytes, origin (topic, partition,
offset) and the reason. Duplicates by event id are recognised downstream, where
the patient's state lives (streams.patient_state).

The validation itself is the pure function ``validate_record``; the agents only
call it and publish.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import faust
from pydantic import ValidationError

from streams.catalogue import Catalogue, UnknownMeasure, UnknownUnit
from streams.schemas import (
    ENROLLMENT_EVENT,
    DeadLetter,
    EnrollmentRecord,
    LabResult,
    Observation,
    Origin,
    PatientReportedOutcome,
    RawObservation,
    WearableReading,
)
from streams.settings import Settings
from streams.telemetry import Telemetry
from streams.topics import Topics

log = logging.getLogger(__name__)

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
    if event_time > now + timedelta(days=settings.max_future_days):
        raise Rejected("future_time", f"event_time {event_time.isoformat()} is in the future")
    if event_time < now - timedelta(days=settings.max_age_days):
        raise Rejected("ancient_time", f"event_time {event_time.isoformat()} is too old")


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
    if not spec.plausible_value(canonical):
        low, high = spec.plausible
        raise Rejected(
            "implausible_value",
            f"{spec.name} = {canonical:g} {spec.unit} outside [{low:g}, {high:g}]",
        )
    return Observation(
        event_id=record.event_id,
        event_time=record.event_time,
        patient_id=record.patient_id,
        measure=spec.name,
        value=canonical,
        unit=spec.unit,
        source=record.source,
        origin=origin,
    )


def validate_enrollment(
    key: bytes | None,
    value: bytes | None,
    origin: Origin,
    settings: Settings,
    now: datetime | None = None,
) -> EnrollmentRecord:
    """An enrolment or exposure change, validated, with its origin; or Rejected."""
    event = _validate(ENROLLMENT_EVENT.validate_json, _check_size(value))
    _check_envelope(key, event.patient_id, event.event_time, now or datetime.now(UTC), settings)
    return EnrollmentRecord(event=event, origin=origin)


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


def register(
    app: faust.App, topics: Topics, catalogue: Catalogue, settings: Settings, telemetry: Telemetry
) -> None:
    """One ingest agent per source topic, and one for enrolments."""
    for source in ("wearables", "labs", "pros", "enrollments"):
        _register_source(app, topics, source, catalogue, settings, telemetry)


def _register_source(
    app: faust.App,
    topics: Topics,
    source: str,
    catalogue: Catalogue,
    settings: Settings,
    telemetry: Telemetry,
) -> None:
    topic = getattr(topics, source)

    async def ingest(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            origin = Origin(
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                timestamp=message.timestamp,
            )
            try:
                if source == "enrollments":
                    record = validate_enrollment(event.key, event.value, origin, settings)
                else:
                    record = validate_observation(
                        source, event.key, event.value, origin, catalogue, settings
                    )
            except Rejected as rejected:
                letter = dead_letter(
                    rejected.reason,
                    rejected.detail,
                    message.topic,
                    message.partition,
                    message.offset,
                    event.key,
                    event.value,
                )
                log.debug("dead-lettered %s:%s: %s", message.topic, message.offset, rejected)
                telemetry.rejected(source, rejected.reason)
                await topics.deadletter.send(key=event.key, value=letter.model_dump_json().encode())
                continue
            telemetry.accepted(source)
            await topics.observations.send(
                key=record.patient_id.encode(), value=record.model_dump_json().encode()
            )

    app.agent(topic, name=f"ingest-{source}")(ingest)
