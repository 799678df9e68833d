"""A measure's score as the step handles it (streams.scoring.ScoreRow) is the
published MeasureScore: the same values, and its JSON the model's own
serialisation byte for byte, whatever the numbers, strings and times."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.schemas import MeasureScore, json_bytes
from streams.scoring import ScoreRow

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-7, 1.5e16, -2.5e-300, 0.1, 1 / 3, 1e300, 5e-324]),
)
TEXT = st.text(max_size=20)  # quotes, backslashes, commas, control and non-ASCII characters
TIMES = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.datetimes(timezones=st.just(timezone(timedelta(hours=-5, minutes=-30)))),
)
CALLS = st.sampled_from(["responder", "non_responder", "uncertain", "insufficient_data"])


@st.composite
def rows(draw) -> ScoreRow:
    return ScoreRow(
        measure=draw(TEXT),
        unit=draw(TEXT),
        direction=draw(st.sampled_from(["higher", "lower"])),
        mcid=draw(NUMBERS),
        mean=draw(NUMBERS),
        sd=draw(NUMBERS),
        lower=draw(NUMBERS),
        upper=draw(NUMBERS),
        level=draw(NUMBERS),
        p_benefit_ge_mcid=draw(NUMBERS),
        p_benefit_gt_0=draw(NUMBERS),
        classification=draw(CALLS),
        recommended_action=draw(st.none() | TEXT),
        population_effect=draw(NUMBERS),
        cohort_deviation=draw(st.none() | NUMBERS),
        individual_deviation=draw(st.none() | NUMBERS),
        effect_scale=draw(st.none() | st.sampled_from(["odds_ratio", "rate_difference"])),
        shrinkage=draw(NUMBERS),
        count_exposed=draw(st.integers(0, 2**62)),
        count_unexposed=draw(st.integers(0, 2**62)),
        last_event_time=draw(TIMES),
        population_version=draw(st.integers(0, 2**62)),
    )


@settings(max_examples=300, deadline=None)
@given(row=rows())
def test_a_score_rows_json_is_the_models_serialisation(row: ScoreRow) -> None:
    """Against the model validated from the same values (an independent
    construction: pydantic's validation, then its serialiser)."""
    values = row._asdict()
    effect = {name: values.pop(name) for name in ("mean", "sd", "lower", "upper")}
    validated = MeasureScore.model_validate(values | {"effect": effect})
    assert row.json() == validated.model_dump_json().encode()
    assert row.json() == json_bytes(row.model())


@settings(max_examples=100, deadline=None)
@given(row=rows())
def test_a_score_row_and_its_model_carry_the_same_values(row: ScoreRow) -> None:
    again = ScoreRow.of(row.model())
    assert again.json() == row.json()
    for name, back, value in zip(ScoreRow._fields, again, row, strict=True):
        both_nan = isinstance(value, float) and math.isnan(value) and math.isnan(back)
        assert back == value or both_nan, name
