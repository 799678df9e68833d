"""``streams.schemas.trusted`` against pydantic's own ``model_construct``: the
same fields, field order (serialisation follows it), fields set and JSON."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, Field

from streams.patient_state import Published
from streams.schemas import CompositeScore, Interval, MeasureScore, PatientEvidence, trusted

INTERVAL = {"mean": 1.0, "sd": 0.5, "lower": 0.2, "upper": 1.8}
CASES = [
    (Interval, INTERVAL),
    (CompositeScore, {"benefit_in_mcid": Interval(**INTERVAL), "measures": ["a"]}),
    (
        Published,
        {
            "population_version": 3,
            "mean": 1.0,
            "sd": 0.5,
            "p_benefit_ge_mcid": 0.7,
            "classification": "benefit",
        },
    ),
    (
        # Fields out of declaration order, defaults and default factories left out.
        PatientEvidence,
        {
            "patient_id": "p",
            "measure": "m",
            "cohort": "c",
            "gram": [[1.0, 2.0], [2.0, 5.0]],
            "reference_time": 3.0,
            "count_exposed": 1,
            "count_unexposed": 2,
        },
    ),
    (
        MeasureScore,
        {
            "measure": "m",
            "unit": "bpm",
            "direction": "lower",
            "mcid": 2.0,
            "effect": Interval(**INTERVAL),
            "level": 0.9,
            "p_benefit_ge_mcid": 0.4,
            "p_benefit_gt_0": 0.8,
            "classification": "uncertain",
            "recommended_action": None,
            "population_effect": 0.5,
            "cohort_deviation": 0.1,
            "individual_deviation": 0.2,
            "shrinkage": 0.3,
            "count_exposed": 4,
            "count_unexposed": 5,
            "last_event_time": datetime(2026, 1, 2, tzinfo=UTC),
            "population_version": 7,
        },
    ),
]


@pytest.mark.parametrize(("cls", "values"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_trusted_is_model_construct(cls: type[BaseModel], values: dict) -> None:
    expected = cls.model_construct(**values)
    got = trusted(cls, **values)
    assert type(got) is cls
    assert list(got.__dict__.items()) == list(expected.__dict__.items())
    assert got.model_fields_set == expected.model_fields_set
    assert got.model_dump_json() == expected.model_dump_json()
    assert got == expected


def test_fresh_default_factories() -> None:
    values = CASES[3][1]
    first, second = trusted(PatientEvidence, **values), trusted(PatientEvidence, **values)
    assert first.covariates == [] and first.covariates is not second.covariates


def test_other_models_go_to_model_construct() -> None:
    class Aliased(BaseModel):
        value: int = Field(alias="v")

    got = trusted(Aliased, v=1)
    assert got.value == 1 and got.model_fields_set == {"value"}
