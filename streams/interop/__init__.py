"""Readings in interoperable formats: HL7 FHIR R4 Observations (``fhir``) and
Open mHealth data points (``open_mhealth``), turned into the project's own
reading records (streams.schemas WearableReading / LabResult /
PatientReportedOutcome) for the source topics.

Pure: bytes in, ``Reading`` (a record to publish, keyed by patient id) or
``streams.validation.Rejected`` (a reason to dead-letter the original bytes)
out; no Kafka here. The agent is streams.agents.interop. docs/ingest.md says
which codes and units map to which measure.
"""
