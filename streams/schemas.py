"""Event schemas of every topic (pydantic). Producers and consumers in any
language get them as JSON Schema from ``efficacy schemas --out DIR``.

Every message carries ``schema_version``, ``event_id`` (unique per event; used to
drop duplicates) and ``event_time`` (when it happened, not when it arrived).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=128)
    event_time: datetime


class RawObservation(Envelope):
    """A reading from a producer: wearable, lab or patient-reported outcome."""

    patient_id: str = Field(min_length=1, max_length=128)
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


class Observation(Envelope):
    """A validated observation in the measure's canonical unit (internal topic)."""

    patient_id: str
    measure: str
    value: float
    unit: str
    source: Literal["wearable", "lab", "pro"]


class DeadLetter(BaseModel):
    """A rejected record: the original bytes, where it came from and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    reason: str
    detail: str
    source_topic: str
    partition: int
    offset: int
    key_b64: str | None
    value_b64: str
    rejected_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
