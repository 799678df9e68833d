"""The real FHIR and Open mHealth examples of tests/data (see each folder's
SOURCE.md), read for tests/test_interop.py and tests/test_interop_worker.py."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
FHIR = DATA / "fhir"
OMH = DATA / "open_mhealth"
HEART_RATE = "observation-example-heart-rate.json"
BLOOD_PRESSURE = "observation-example-bloodpressure.json"
GLUCOSE = "observation-example-f001-glucose.json"
HBA1C = "observation-bser-ha1c-eve-everywoman.json"


def fhir_resource(name: str) -> dict:
    return json.loads((FHIR / name).read_text())


def bundle(*resources: dict) -> dict:
    """A collection Bundle of ``resources`` (FHIR R4 Bundle.entry.resource)."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": resource} for resource in resources],
    }


def omh_body(name: str) -> dict:
    return json.loads((OMH / name).read_text())


def omh_schema(name: str) -> tuple[str, str]:
    """(schema name, version) of a sample's file name, e.g. heart-rate-2.0-x.json."""
    parts = name.split("-")
    at = next(i for i, part in enumerate(parts) if part[0].isdigit())
    return "-".join(parts[:at]), parts[at]


def omh_point(name: str, **header: object) -> dict:
    """The body sample ``name`` as a data point with the header sample, its
    schema_id set to the body's schema; ``header`` overrides header fields."""
    schema, version = omh_schema(name)
    head = json.loads((OMH / "header-1.1-with-user-id.json").read_text())
    head["schema_id"] = {"namespace": "omh", "name": schema, "version": version}
    head.update(header)
    return {"header": head, "body": omh_body(name)}


def encode(document: dict) -> bytes:
    return json.dumps(document).encode()
