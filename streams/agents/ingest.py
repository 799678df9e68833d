"""ingest: validate raw observations, forward them keyed by patient, dead-letter the rest.

A bad record never stops the stream and is never dropped silently: it goes to
the dead-letter topic with its original bytes, origin (topic, partition,
offset) and the reason.
"""

from __future__ import annotations

import base64
import logging

import faust
from pydantic import ValidationError

from streams.schemas import (
    DeadLetter,
    LabResult,
    Observation,
    PatientReportedOutcome,
    RawObservation,
    WearableReading,
)
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


def parse_raw(schema: type[RawObservation], key: bytes | None, value: bytes | None) -> Observation:
    """Validate one raw record into an Observation, or raise Rejected."""
    if value is None:
        raise Rejected("empty", "record has no value")
    if len(value) > MAX_RECORD_BYTES:
        raise Rejected("oversized", f"{len(value)} bytes > {MAX_RECORD_BYTES}")
    try:
        record = schema.model_validate_json(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        reason = "malformed_json" if first.get("type") == "json_invalid" else "invalid_schema"
        raise Rejected(reason, f"{where}: {first.get('msg')}") from None
    if key is not None and key.decode(errors="replace") != record.patient_id:
        raise Rejected("key_mismatch", "record key must be the patient_id")
    return Observation(
        event_id=record.event_id,
        event_time=record.event_time,
        patient_id=record.patient_id,
        measure=record.measure,
        value=record.value,
        unit=record.unit,
        source=record.source,
    )


def dead_letter(event: faust.EventT, rejected: Rejected) -> DeadLetter:
    message = event.message
    return DeadLetter(
        reason=rejected.reason,
        detail=rejected.detail,
        source_topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key_b64=base64.b64encode(message.key).decode() if message.key is not None else None,
        value_b64=base64.b64encode(message.value or b"").decode(),
    )


def register(app: faust.App, topics: Topics) -> None:
    """One ingest agent per source topic."""
    for source, topic in zip(("wearables", "labs", "pros"), topics.sources, strict=True):
        _register_source(app, topics, source, topic)


def _register_source(app: faust.App, topics: Topics, source: str, topic: faust.TopicT) -> None:
    schema = SCHEMA_OF_SOURCE[source]

    async def ingest(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                observation = parse_raw(schema, event.key, event.value)
            except Rejected as rejected:
                letter = dead_letter(event, rejected)
                log.debug("dead-lettered %s:%s: %s", letter.source_topic, letter.offset, rejected)
                await topics.deadletter.send(key=event.key, value=letter.model_dump_json().encode())
                continue
            await topics.observations.send(
                key=observation.patient_id.encode(), value=observation.model_dump_json().encode()
            )

    app.agent(topic, name=f"ingest-{source}")(ingest)
