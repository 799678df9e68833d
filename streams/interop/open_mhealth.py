"""Open mHealth data points (``{"header": ..., "body": ...}``, data-point 1.x)
as readings of the catalogue's measures.

A measure lists the quantities it takes as ``omh`` codes (streams.catalogue):
``namespace:schema#property`` names the body property holding the value (a
``{"value", "unit"}`` unit-value, or a bare number in the measure's canonical
unit, as step-count 1.x/2.x writes its count), so a blood-pressure data point
yields a reading for each of its properties some measure lists. Conditions
after ``?`` (``field=value|value``, joined by ``&``) restrict which data points
qualify: a body field must hold one of the values (``-``: the field may be
absent), ``interval=24h``: the time frame must be an interval that long (an
hour either way, for daylight saving). The rules, in the order they are checked
(the reason codes dead-lettered):

- the record is JSON (``malformed_json``), a data point with a header that has
  an ``id`` and a ``schema_id`` and a body object (``invalid_resource``);
- some measure lists the header's ``schema_id`` (``unknown_code``);
- ``header.user_id`` is the programme's patient id (``missing_patient``);
- the body is one measurement, not a ``descriptive_statistic`` over a period
  (``aggregate_value``);
- ``effective_time_frame`` gives a ``date_time``, or a ``time_interval``'s end
  (``end_date_time``, or ``start_date_time`` plus ``duration``), with a time
  zone (``missing_time``; a malformed time: ``invalid_resource``);
- the body meets the code's conditions (``wrong_context``) and holds the value
  (``missing_value``) in a unit the measure accepts (``unknown_unit``).

The event id is ``omh:<header.id>#<property>``. The source topic is wearables
when the measure accepts it from there.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from streams.catalogue import Catalogue, MeasureSpec
from streams.interop.readings import Candidate, load_json, located, patient_id, preferred_source
from streams.validation import Rejected

ABSENT = "-"
INTERVAL = "interval"
INTERVAL_TOLERANCE = timedelta(hours=1)
#: Open mHealth duration units (duration-unit-value) in hours; longer ones
#: (months, years) have no fixed length.
HOURS = {"ps": 1e-12 / 3600, "ns": 1e-9 / 3600, "us": 1e-6 / 3600, "ms": 1e-3 / 3600,
         "sec": 1 / 3600, "min": 1 / 60, "h": 1.0, "d": 24.0, "wk": 168.0}  # fmt: skip


class SchemaId(BaseModel):
    model_config = ConfigDict(extra="allow")

    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1)
    version: str


class Header(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    schema_id: SchemaId
    user_id: Any = None  # checked as a patient id, with its own reason


class DataPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    header: Header
    body: dict[str, Any]


class Duration(BaseModel):
    value: float
    unit: str


class TimeInterval(BaseModel):
    model_config = ConfigDict(extra="allow")

    start_date_time: AwareDatetime | None = None
    end_date_time: AwareDatetime | None = None
    duration: Duration | None = None

    def length(self) -> timedelta | None:
        if self.start_date_time and self.end_date_time:
            return self.end_date_time - self.start_date_time
        if self.duration and self.duration.unit in HOURS:
            return timedelta(hours=self.duration.value * HOURS[self.duration.unit])
        return None

    def end(self) -> datetime | None:
        if self.end_date_time is not None:
            return self.end_date_time
        length = self.length()
        return self.start_date_time + length if self.start_date_time and length else None


class TimeFrame(BaseModel):
    model_config = ConfigDict(extra="allow")

    date_time: AwareDatetime | None = None
    time_interval: TimeInterval | None = None


def parse(value: bytes, catalogue: Catalogue) -> list[Candidate | Rejected]:
    """The readings of an Open mHealth data point (streams.interop.readings.Parser).
    Raises Rejected when the data point as a whole is unusable."""
    point = _validate(DataPoint, load_json(value), "data point")
    schema = f"{point.header.schema_id.namespace}:{point.header.schema_id.name}"
    codes = catalogue.omh_codes(schema)
    if not codes:
        raise Rejected("unknown_code", f"no catalogue measure takes {schema} data points")
    patient = patient_id(point.header.user_id, "header.user_id")
    body = point.body
    if "descriptive_statistic" in body:
        raise Rejected(
            "aggregate_value",
            f"a {body['descriptive_statistic']!r} over a period, not one measurement",
        )
    frame = body.get("effective_time_frame")
    if not isinstance(frame, dict):
        raise Rejected("missing_time", "the body has no effective_time_frame")
    frame = _validate(TimeFrame, frame, "effective_time_frame")
    interval = frame.time_interval
    time = frame.date_time or (interval.end() if interval else None)
    if time is None:
        raise Rejected("missing_time", "effective_time_frame has no date_time or interval end")
    found: list[Candidate | Rejected] = []
    for spec, code in codes:
        prop = code.split("#", 1)[1].split("?", 1)[0]
        try:
            _check_conditions(code, body, interval)
            number, unit = _quantity(body.get(prop), prop, spec)
        except Rejected as rejected:
            found.append(located(rejected, prop))
            continue
        found.append(
            Candidate(
                event_id=f"omh:{point.header.id}#{prop}",
                patient_id=patient,
                event_time=time,
                measure=spec,
                value=number,
                unit=unit,
                source=preferred_source(spec, "wearable"),
                where=prop,
            )
        )
    return found


def _validate(model: type[BaseModel], data: object, what: str):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or what
        raise Rejected("invalid_resource", f"{what}: {where}: {first.get('msg')}") from None


def conditions(code: str) -> dict[str, tuple[str, ...]]:
    """The conditions of an ``omh`` code: field -> accepted values."""
    _, _, query = code.partition("?")
    out = {}
    for term in filter(None, query.split("&")):
        field, _, values = term.partition("=")
        out[field.strip()] = tuple(v.strip() for v in values.split("|"))
    return out


def _check_conditions(code: str, body: dict, interval: TimeInterval | None) -> None:
    for field, accepted in conditions(code).items():
        if field == INTERVAL:
            (wanted,) = accepted
            hours = float(wanted.removesuffix("h"))
            length = interval.length() if interval else None
            if length is None or abs(length - timedelta(hours=hours)) > INTERVAL_TOLERANCE:
                got = f"{length.total_seconds() / 3600:g} h" if length else "no interval"
                raise Rejected("wrong_context", f"needs a {hours:g} h interval, got {got}")
            continue
        value = body.get(field)
        if value is None and ABSENT in accepted:
            continue
        if value not in accepted:
            raise Rejected("wrong_context", f"{field} is {value!r}, not {' or '.join(accepted)}")


def _quantity(raw: object, prop: str, spec: MeasureSpec) -> tuple[float, str]:
    """(value, unit) of a body property: a unit-value or a bare count."""
    if isinstance(raw, dict):
        number, unit = raw.get("value"), raw.get("unit")
        if _is_number(number) and isinstance(unit, str) and unit:
            return float(number), unit
    elif _is_number(raw):
        return float(raw), spec.unit
    raise Rejected("missing_value", f"{prop} is not a value with a unit")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
