"""A patient's readings applied together (``apply_observations``, as the
patients agent applies a backlog's run of one patient's readings) against the
same readings applied one at a time by ``apply_event``: the same record, bit
for bit, and the same outcome, whatever the run holds (replays, duplicates,
readings older than the sealed evidence, runs long enough to seal and to
forget event ids, adherence, time-varying covariates, Bernoulli and Poisson
measures), and the statistics against the batch computation
(``model.evidence.add_vectors`` of a run against ``add_reading`` of each, exactly)."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.programme import SIMULATED_COVARIATES
from model.evidence import add_reading, add_vectors, empty_packed, reading_vectors
from streams.app import measure_models
from streams.catalogue import DEFAULT_CATALOGUE, Catalogue
from streams.patient_state import (
    RECENT_KEEP,
    SEEN_KEEP,
    apply_event,
    apply_observations,
)
from streams.schemas import Enrollment, EnrollmentRecord, ExposureChange, Observation, Origin
from tests.test_families_catalogue import ENTRIES as FAMILY_ENTRIES

START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    """The default catalogue with a reading covariate (``activity``)."""
    path = tmp_path_factory.mktemp("gaussian") / "measures.toml"
    path.write_text(DEFAULT_CATALOGUE.read_text() + SIMULATED_COVARIATES)
    return measure_models(Catalogue.load(path), _settings())


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "measures.toml"
    path.write_text(FAMILY_ENTRIES)
    return measure_models(Catalogue.load(path), _settings())


def _settings():
    from streams.settings import Settings

    return Settings(max_age_days=36500.0)


def enrolled(models, covariates):
    """A patient enrolled at START (exposed), the dose changed on day 20."""
    enrolment = EnrollmentRecord(
        event=Enrollment(
            event_id="enr", event_time=START, patient_id="p", cohort="c", exposed=True
        ),
        origin=Origin(topic="enrollments", partition=0, offset=0),
        covariates=covariates,
    )
    record, _ = apply_event(None, enrolment, models)
    change = EnrollmentRecord(
        event=ExposureChange(
            event_id="dose", event_time=START + timedelta(days=20), patient_id="p", exposure=0.5
        ),
        origin=Origin(topic="enrollments", partition=0, offset=1),
    )
    record, _ = apply_event(record, change, models)
    return record


def observations(rng: random.Random, models, measures, values, count):
    """``count`` readings of ``measures`` over ~60 days, some late (older than
    the newest by up to 30 days: some older than the sealed evidence), a few
    sent again from their own origin (replays) or another (duplicates)."""
    made: list[Observation] = []
    offset = 10
    for _ in range(count):
        roll = rng.random()
        if made and roll < 0.06:  # a replay: the same record read again
            made.append(rng.choice(made))
            continue
        offset += 1
        if made and roll < 0.12:  # a duplicate: the same event id from another record
            made.append(
                rng.choice(made).model_copy(
                    update={"origin": Origin(topic="labs", partition=1, offset=offset)}
                )
            )
            continue
        measure = rng.choice(measures)
        day = 60.0 * len(made) / count + (rng.random() * -30.0 if rng.random() < 0.15 else 0.0)
        made.append(
            Observation(
                event_id=f"e{offset}",
                event_time=START + timedelta(days=max(day, 0.01)),
                patient_id="p",
                measure=measure,
                value=values[measure](rng),
                unit="u",
                source="wearable",
                origin=Origin(topic="wearables", partition=0, offset=offset),
                adherence=rng.choice([1.0, 1.0, 0.5, 0.0]),
                time_covariates=[rng.gauss(0, 1) for _ in models[measure].time_covariates],
            )
        )
    return made


def one_at_a_time(record, events, models):
    outcomes = []
    for event in events:
        record, outcome = apply_event(record, event, models, copy=False)
        outcomes.append(outcome)
    return record, outcomes


def together(record, events, models, cuts):
    """apply_observations of the runs between ``cuts``."""
    outcomes, applied = [], []
    bounds = [0, *sorted(cuts), len(events)]
    for start, end in itertools.pairwise(bounds):
        if start < end:
            outcome, done = apply_observations(record, events[start:end], models)
            outcomes.append(outcome)
            applied.extend(done)
    return record, outcomes, applied


def summary(outcomes):
    """What the agent reads of the outcomes: touched measures, replays and the
    rejected events' reasons with their origins."""
    return (
        set().union(*(o.touched for o in outcomes)),
        sum(o.replays for o in outcomes),
        [(e.event_id, e.origin.offset, reason, detail) for o in outcomes
         for e, reason, detail in o.rejected],
    )  # fmt: skip


GAUSSIAN_VALUES = {
    "resting_heart_rate": lambda rng: rng.gauss(70, 8),
    "hba1c": lambda rng: rng.gauss(7, 1),
}
FAMILY_VALUES = {
    "symptom_today": lambda rng: float(rng.random() < 0.3),
    "rescue_inhaler_uses": lambda rng: float(rng.randrange(6)),
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.sampled_from([2, 9, 70, 2 * RECENT_KEEP + 40, SEEN_KEEP + 60]),
    runs=st.integers(1, 6),
    family=st.booleans(),
)
def test_readings_applied_together_are_the_same_record_as_one_at_a_time(
    gaussian, families, seed, count, runs, family
):
    rng = random.Random(seed)
    models, values = (families, FAMILY_VALUES) if family else (gaussian, GAUSSIAN_VALUES)
    covariates = None if family else [50.0, 1.0]
    events = observations(rng, models, list(values), values, count)
    cuts = rng.sample(range(1, count), min(runs - 1, count - 1))

    expected, expected_outcomes = one_at_a_time(enrolled(models, covariates), events, models)
    record, outcomes, applied = together(enrolled(models, covariates), events, models, cuts)

    assert record.model_dump_json() == expected.model_dump_json()
    assert summary(outcomes) == summary(expected_outcomes)
    assert applied == [bool(o.touched) for o in expected_outcomes]


def test_a_long_run_seals_forgets_and_still_matches(gaussian):
    """One run of 3·RECENT_KEEP + SEEN_KEEP readings of one measure: it must
    seal old readings and forget old event ids on the way, as one at a time."""
    rng = random.Random(7)
    count = 3 * RECENT_KEEP + SEEN_KEEP
    events = observations(rng, gaussian, ["resting_heart_rate"], GAUSSIAN_VALUES, count)
    expected, _ = one_at_a_time(enrolled(gaussian, [50.0, 1.0]), events, gaussian)
    record, _, _ = together(enrolled(gaussian, [50.0, 1.0]), events, gaussian, [])
    stats = record.measures["resting_heart_rate"]
    assert stats.sealed_gram is not None and len(stats.recent) <= 2 * RECENT_KEEP
    assert record.forgotten  # event ids were forgotten, their offsets kept
    assert record.model_dump_json() == expected.model_dump_json()


def test_observations_of_a_patient_not_enrolled_are_refused(gaussian):
    record, _ = apply_event(None, observations(random.Random(1), gaussian, ["hba1c"],
                                               GAUSSIAN_VALUES, 1)[0], gaussian)  # fmt: skip
    with pytest.raises(ValueError, match="enrolled"):
        apply_observations(record, [], gaussian)


@pytest.mark.parametrize("half_life", ["all-time", "window"])
def test_add_vectors_of_a_run_is_add_reading_in_turn_bit_for_bit(gaussian, half_life):
    model = gaussian["resting_heart_rate"]
    config = model if half_life == "all-time" else model.recent_window
    rng = random.Random(3)
    rows = [
        (rng.choice([0.0, 0.5, 1.0]), 20454.0 + rng.uniform(-20, 20), rng.gauss(70, 8),
         tuple(rng.gauss(0, 1) for _ in config.time_covariates))
        for _ in range(200)
    ]  # fmt: skip
    gram, reference = empty_packed(config), float("-inf")
    for exposure, time, value, covariates in rows:
        gram, reference = add_reading(gram, reference, exposure, time, value, config, covariates)
    vectors, times = reading_vectors(rows, config), [row[1] for row in rows]
    together = add_vectors(empty_packed(config), float("-inf"), times, vectors, config.half_life)
    assert together == (gram, reference)
    assert add_vectors(gram, reference, [], [], config.half_life) == (gram, reference)
    with pytest.raises(ValueError, match="time-varying covariates"):
        reading_vectors([(1.0, 20454.0, 70.0, ())], config)
