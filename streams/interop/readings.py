"""What the FHIR and Open mHealth parsers share: a reading found in a foreign
record (``Candidate``), and its check and conversion into the record the
project's producers write (``Reading``).

A candidate becomes a reading only if the patients agent would accept it:
``settle`` runs streams.validation.validate_observation on the record it
builds (unit, plausibility, time bounds, source), so a reading that would be
dead-lettered there is dead-lettered at ingest instead, with the original
FHIR or Open mHealth bytes rather than our re-encoding of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from streams.catalogue import Catalogue, MeasureSpec, Source, UnknownUnit
from streams.schemas import Origin, RawObservation
from streams.settings import Settings
from streams.validation import SCHEMA_OF_SOURCE, Rejected, validate_observation

#: A Bundle of many Observations is bigger than one of our readings
#: (streams.validation.MAX_RECORD_BYTES); Kafka's default message limit is 1 MB.
MAX_INTEROP_BYTES = 1024 * 1024
#: The patient id rule of streams.schemas.PatientId.
PATIENT_ID = re.compile(r"^[^\s/]{1,128}$")
#: The source topic (short name) of each source.
TOPIC_OF_SOURCE: dict[str, str] = {
    schema.model_fields["source"].default: topic for topic, schema in SCHEMA_OF_SOURCE.items()
}


@dataclass(frozen=True)
class Candidate:
    """One reading of a foreign record: ``unit`` is spelled as the record has
    it (a UCUM code or one of the measure's unit names); ``where`` names its
    place in the record for a rejection's detail (e.g. ``entry[2]``)."""

    event_id: str
    patient_id: str
    event_time: datetime
    measure: MeasureSpec
    value: float
    unit: str
    source: Source
    where: str = ""


@dataclass(frozen=True)
class Reading:
    """A record to publish: ``topic`` is the source topic's short name
    (``wearables``, ``labs``, ``pros``), ``key`` the patient id."""

    topic: str
    key: bytes
    value: bytes
    measure: str


Outcome = Reading | Rejected
Parser = Callable[[bytes, Catalogue], list[Candidate | Rejected]]


def check_size(value: bytes | None) -> bytes:
    if not value:
        raise Rejected("empty", "record has no value")
    if len(value) > MAX_INTEROP_BYTES:
        raise Rejected("oversized", f"{len(value)} bytes > {MAX_INTEROP_BYTES}")
    return value


def load_json(value: bytes) -> dict:
    """The record's JSON object; Rejected ``malformed_json`` or ``invalid_resource``."""
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Rejected("malformed_json", str(error)) from None
    if not isinstance(data, dict):
        raise Rejected("invalid_resource", f"a JSON {type(data).__name__}, not an object")
    return data


def located(rejected: Rejected, where: str) -> Rejected:
    """``rejected`` with ``where`` (a place in the record) before its detail."""
    return Rejected(rejected.reason, f"{where}: {rejected.detail}") if where else rejected


def patient_id(value: object, where: str) -> str:
    """``value`` as a patient id; Rejected ``missing_patient`` if it is none."""
    if not isinstance(value, str) or not value:
        raise Rejected("missing_patient", f"no patient in {where}")
    if not PATIENT_ID.match(value):
        raise Rejected("missing_patient", f"{where} is not a usable patient id")
    return value


def preferred_source(spec: MeasureSpec, hint: Source | None) -> Source:
    """The source topic a reading goes to: the one its record suggests when the
    measure accepts it from there, otherwise the measure's first source."""
    return hint if hint is not None and hint in spec.sources else spec.sources[0]


def settle(
    candidate: Candidate,
    origin: Origin,
    catalogue: Catalogue,
    settings: Settings,
    now: datetime | None = None,
) -> Reading:
    """The record of ``candidate`` for its source topic, in the measure's
    canonical unit, as the patients agent would accept it; Rejected with the
    reason it would not."""
    spec = candidate.measure
    try:
        value = spec.to_canonical(candidate.value, candidate.unit)
    except UnknownUnit as error:
        raise Rejected("unknown_unit", str(error)) from None
    topic = TOPIC_OF_SOURCE[candidate.source]
    try:
        record: RawObservation = SCHEMA_OF_SOURCE[topic](
            event_id=candidate.event_id,
            event_time=candidate.event_time,
            patient_id=candidate.patient_id,
            measure=spec.name,
            value=value,
            unit=spec.unit,
        )
    except ValidationError as error:  # a parser let through what the schema refuses
        first = error.errors()[0]
        raise Rejected("invalid_resource", f"{first.get('loc')}: {first.get('msg')}") from None
    key = candidate.patient_id.encode()
    encoded = record.model_dump_json(exclude_none=True).encode()
    validate_observation(topic, key, encoded, origin, catalogue, settings, now)
    return Reading(topic=topic, key=key, value=encoded, measure=spec.name)


def readings(
    parse: Parser,
    value: bytes | None,
    origin: Origin,
    catalogue: Catalogue,
    settings: Settings,
    now: datetime | None = None,
) -> list[Outcome]:
    """Every reading of a foreign record (``parse`` finds them), each checked
    (``settle``), or the reasons they cannot be used. Never raises Rejected."""
    try:
        found = parse(check_size(value), catalogue)
    except Rejected as rejected:
        return [rejected]
    outcomes: list[Outcome] = []
    for item in found:
        if isinstance(item, Rejected):
            outcomes.append(item)
            continue
        try:
            outcomes.append(settle(item, origin, catalogue, settings, now))
        except Rejected as rejected:
            outcomes.append(located(rejected, item.where))
    return outcomes
