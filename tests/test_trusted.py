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

    class Counted(BaseModel):  # trusted creates instances with object.__new__
        value: int

        def __new__(cls, *args: object, **kwargs: object) -> Counted:
            made.append(cls)
            return super().__new__(cls)

    made: list[type] = []
    got = trusted(Counted, value=2)
    assert got.value == 2 and made == [Counted]


def test_validated_observations_are_what_validation_would_build() -> None:
    """validate_observation builds its Observation without validation: the same
    values, types and JSON as pydantic's validated model of the same fields,
    over a programme's readings in every source, alternative units and adherence."""
    from cli.programme import build_programme
    from streams.catalogue import Catalogue
    from streams.schemas import Observation, Origin
    from streams.settings import Settings
    from streams.validation import validate_observation

    catalogue, settings = Catalogue.load(), Settings(max_age_days=36500.0)
    programme = build_programme(
        ["resting_heart_rate", "hba1c", "phq9"], num_patients=4, obs_per_patient=20,
        alternative_unit_fraction=0.5, seed=4,
    )  # fmt: skip
    checked = 0
    for offset, raw in enumerate(programme.send_order()):
        if raw.topic == "enrollments":
            continue
        origin = Origin(topic=raw.topic, partition=0, offset=offset, timestamp=1.7e9)
        got = validate_observation(raw.topic, raw.key, raw.value, origin, catalogue, settings)
        expected = Observation(**dict(got))
        assert [(k, type(v)) for k, v in got.__dict__.items()] == [
            (k, type(v)) for k, v in expected.__dict__.items()
        ]
        assert got.model_dump_json() == expected.model_dump_json()
        assert got == expected
        checked += 1
    assert checked == 3 * 4 * 20
