"""HL7 FHIR R4 ``Observation`` resources (one, or the Observation entries of a
``Bundle``) as readings of the catalogue's measures.

Parsed and validated with ``fhir.resources`` (its R4B models: R4B changed
nothing in Observation, Quantity, Reference or Bundle.entry over R4). An
Observation yields a reading for its ``code`` and for each ``component``
whose LOINC code a measure lists (streams.catalogue ``loinc``): a
blood-pressure panel yields its systolic component; components no measure
lists (the diastolic one) are left out. The rules, in the order they are
checked (the reason codes dead-lettered):

- the record is JSON (``malformed_json``), a valid R4 Observation or Bundle
  (``invalid_resource``, ``unsupported_resource``);
- ``status`` is final, amended or corrected (``unusable_status``);
- a code or component code is a catalogue LOINC code (``unknown_code``);
- ``subject`` references ``Patient/<id>``; ``<id>`` is the programme's patient
  id (``missing_patient``);
- ``effectiveDateTime``, ``effectiveInstant`` or ``effectivePeriod`` (its end,
  else its start) gives the time, a date alone meaning 00:00 UTC that day
  (``missing_time``; a year or month alone: ``imprecise_time``);
- the value is a ``valueQuantity`` with a value (``missing_value``) in a unit
  the measure accepts, by its UCUM ``code`` when ``system`` is UCUM, else by
  its ``unit`` text (``unknown_unit``, raised when the reading is settled).

The event id (the patients agent drops duplicates by it) is the Observation's
first identifier, else its Bundle ``fullUrl``, else ``Observation/<id>``, else
a digest of the resource; a component's reading adds ``#<LOINC code>``.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from streams.catalogue import Catalogue, MeasureSpec, Source
from streams.interop.readings import Candidate, load_json, located, patient_id, preferred_source
from streams.validation import Rejected

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
USABLE_STATUS = frozenset({"final", "amended", "corrected"})
#: Observation categories that say which of our sources a reading comes from.
SOURCE_OF_CATEGORY: dict[str, Source] = {
    "laboratory": "lab",
    "survey": "pro",
    "vital-signs": "wearable",
    "activity": "wearable",
}
PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([^/]+)(?:/_history/[^/]+)?$")
MAX_EVENT_ID = 128  # streams.schemas.Envelope.event_id


def parse(value: bytes, catalogue: Catalogue) -> list[Candidate | Rejected]:
    """The readings of a FHIR Observation or Bundle (streams.interop.readings.Parser).
    Raises Rejected when the record as a whole is unusable; a Bundle entry's
    problem is that entry's Rejected in the list."""
    data = load_json(value)
    kind = data.get("resourceType")
    if kind == "Observation":
        return observation(_model(Observation, data), catalogue)
    if kind == "Bundle":
        bundle = _model(Bundle, data)
        found: list[Candidate | Rejected] = []
        for index, entry in enumerate(bundle.entry or []):
            resource = entry.resource
            if isinstance(resource, Observation):
                found += observation(resource, catalogue, entry.fullUrl, f"entry[{index}]")
        if not found:
            raise Rejected("unsupported_resource", "the Bundle has no Observation entry")
        return found
    raise Rejected("unsupported_resource", f"resourceType {kind!r}: only Observation or Bundle")


def _model(model: type[Observation] | type[Bundle], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or model.__name__
        message = " ".join(str(first.get("msg", "")).split())  # fhir.resources wraps lines
        raise Rejected("invalid_resource", f"{model.__name__}.{where}: {message}") from None


def observation(
    resource: Observation, catalogue: Catalogue, full_url: str | None = None, where: str = ""
) -> list[Candidate | Rejected]:
    """The readings of one Observation (``where``: its place in a Bundle)."""
    try:
        if resource.status not in USABLE_STATUS:
            raise Rejected("unusable_status", f"status {resource.status!r} is not final")
        targets = _targets(resource, catalogue)
        patient = _patient(resource)
        time = _time(resource)
    except Rejected as rejected:
        return [located(rejected, where)]
    hint = _source_hint(resource)
    base = _event_base(resource, full_url)
    found: list[Candidate | Rejected] = []
    for code, spec, quantity, component in targets:
        place = ", ".join(filter(None, [where, f"component {code}" if component else ""]))
        if quantity is None or quantity.value is None:
            found.append(located(Rejected("missing_value", f"{code} has no valueQuantity"), place))
            continue
        unit = quantity.code if quantity.system == UCUM and quantity.code else quantity.unit
        unit = unit or quantity.code
        if not unit:
            found.append(located(Rejected("unknown_unit", f"{code} has no unit"), place))
            continue
        found.append(
            Candidate(
                event_id=_event_id(base, code if component else None),
                patient_id=patient,
                event_time=time,
                measure=spec,
                value=float(quantity.value),
                unit=unit,
                source=preferred_source(spec, hint),
                where=place,
            )
        )
    return found


def _targets(resource: Observation, catalogue: Catalogue) -> list[tuple]:
    """(LOINC code, measure, quantity, is-a-component) of every coded value a
    measure lists; Rejected ``unknown_code`` when there is none."""
    targets, seen = [], []
    for concept, quantity, component in [
        (resource.code, resource.valueQuantity, False),
        *((c.code, c.valueQuantity, True) for c in resource.component or []),
    ]:
        for coding in (concept.coding or []) if concept else []:
            if coding.system != LOINC or not coding.code:
                continue
            seen.append(coding.code)
            spec: MeasureSpec | None = catalogue.by_loinc(coding.code)
            if spec is not None:
                targets.append((coding.code, spec, quantity, component))
                break  # one reading per code or component
    if not targets:
        codes = ", ".join(seen) or "none"
        raise Rejected("unknown_code", f"no catalogue measure has a LOINC code of {codes}")
    return targets


def _patient(resource: Observation) -> str:
    reference = resource.subject.reference if resource.subject else None
    if not reference:
        raise Rejected("missing_patient", "the Observation has no subject reference")
    match = PATIENT_REFERENCE.search(reference)
    if match is None:
        raise Rejected("missing_patient", "the subject is not a Patient/<id> reference")
    return patient_id(match.group(1), "the subject reference")


def _time(resource: Observation) -> datetime:
    period = resource.effectivePeriod
    value = (
        resource.effectiveDateTime
        or resource.effectiveInstant
        or (period.end or period.start if period else None)
    )
    if value is None:
        raise Rejected("missing_time", "no effectiveDateTime, effectiveInstant or effectivePeriod")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise Rejected("missing_time", "the effective time has no time zone")
        return value
    if isinstance(value, date):  # a day: its start in UTC
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise Rejected("imprecise_time", f"effective time {value!r} is not a day or an instant")


def _source_hint(resource: Observation) -> Source | None:
    for concept in resource.category or []:
        for coding in concept.coding or []:
            if coding.system == CATEGORY and coding.code in SOURCE_OF_CATEGORY:
                return SOURCE_OF_CATEGORY[coding.code]
    return None


def _event_base(resource: Observation, full_url: str | None) -> str:
    for identifier in resource.identifier or []:
        if identifier.value:
            return f"{identifier.system or ''}|{identifier.value}"
    if full_url:
        return full_url
    if resource.id:
        return f"Observation/{resource.id}"
    return "sha256:" + hashlib.sha256(resource.model_dump_json().encode()).hexdigest()


def _event_id(base: str, component: str | None) -> str:
    event_id = f"fhir:{base}" + (f"#{component}" if component else "")
    if len(event_id) > MAX_EVENT_ID:
        event_id = "fhir:sha256:" + hashlib.sha256(event_id.encode()).hexdigest()
    return event_id
