"""Bernoulli and Poisson measures on the stream's pure side: the catalogue's
streaming model of a family measure, and a patient's record keeping the
measure's cell statistics (model.families) reading by reading, in any arrival
order, through late exposure changes, sealing and forgetting, equal to the
batch cell statistics of the unique readings."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from model.families import add_cell_reading, cell_stats, family_stats_from_events
from streams.app import measure_models
from streams.patient_state import RECENT_KEEP, PatientRecord, apply_event, days, patient_evidence
from streams.schemas import Enrollment, EnrollmentRecord, ExposureChange, Observation, Origin
from streams.settings import Settings
from tests.test_families_catalogue import catalogue

SETTINGS = Settings(max_age_days=36500.0)
START = datetime(2025, 1, 1, tzinfo=UTC)
DRAWS = 100


def models_of(tmp_path, half_life=None):
    loaded = catalogue(tmp_path)
    return {
        name: spec.model_config_for(
            time_origin_days=days(START),
            time_scale_days=30.0,
            half_life_days=half_life,
            recent_half_life_days=7.0,
            covariates=loaded.covariates,
        )
        for name, spec in loaded.measures.items()
    }


def test_a_family_measure_streams_cells_without_trend_window_or_standardisation(tmp_path):
    models = models_of(tmp_path, half_life=90.0)
    for name, family in (("symptom_today", "bernoulli"), ("rescue_inhaler_uses", "poisson")):
        model = models[name]
        assert model.family == family
        assert not model.time_trend and not model.time_covariates
        assert model.recent_window is None  # no drift window: its checks are Gaussian
        assert model.half_life == 90.0
        std = model.standardization
        assert (std.outcome_location, std.outcome_scale, std.exposure_scale) == (0.0, 1.0, 1.0)
        assert model.stat_shape == (5,)
    assert measure_models(catalogue(tmp_path), SETTINGS)["symptom_today"].family == "bernoulli"


def test_family_stats_from_events_are_the_weighted_cells():
    """Against cell_stats with the forgetting weights written out by hand."""
    rng = np.random.default_rng(3)
    patient = rng.integers(0, 4, 60)
    time = rng.uniform(0.0, 50.0, 60)
    exposure = rng.choice([0.0, 0.5, 1.0], 60)  # a dose of 0.5 is exposure
    outcome = rng.poisson(2.0, 60).astype(float)
    from model.config import ModelConfig

    model = ModelConfig(time_trend=False, family="poisson", half_life=10.0)
    stats = family_stats_from_events(4, patient, exposure, time, outcome, model)
    latest = np.array([time[patient == p].max() for p in range(4)])
    weights = 0.5 ** ((latest[patient] - time) / 10.0)
    expected = cell_stats(4, patient, (exposure > 0).astype(float), outcome, "poisson",
                          weights=weights)  # fmt: skip
    np.testing.assert_allclose(stats.gram, expected, rtol=1e-12)
    np.testing.assert_array_equal(stats.reference_time, latest)
    np.testing.assert_array_equal(
        stats.count_exposed, [np.sum((patient == p) & (exposure > 0)) for p in range(4)]
    )
    # the one-reading step agrees with the batch one
    cells, reference = [0.0] * 5, -np.inf
    for k in np.flatnonzero(patient == 0):
        cells, reference = add_cell_reading(
            cells, reference, float(exposure[k] > 0), time[k], outcome[k], "poisson", 10.0
        )
    np.testing.assert_allclose(cells, stats.gram[0], rtol=1e-10)


def _readings(rng, family, count, span):
    times = np.sort(rng.uniform(0.0, span, count))
    if family == "bernoulli":
        values = rng.integers(0, 2, count).astype(float)
    else:
        values = rng.poisson(1.5, count).astype(float)
    return times, values


@pytest.mark.parametrize("half_life", [None, 20.0])
@pytest.mark.parametrize("shuffle_seed", [0, 1])
def test_a_record_keeps_the_batch_cells_in_any_order(tmp_path, half_life, shuffle_seed):
    """Three patients, both family measures, 300 readings each over 300 days
    (old readings are sealed: 300 > 2·RECENT_KEEP), exposure starting on day 100
    and stopping on day 280; the enrolment, the exposure changes and the readings
    arrive shuffled (within the reorder window for the stop), every step goes
    through the table's JSON. The record's cells equal the batch cells of the
    readings with their exposure from the final timeline."""
    models = models_of(tmp_path, half_life=half_life)
    rng = np.random.default_rng(11)
    events, truth = [], {}
    offset = 0

    def origin(topic):
        nonlocal offset
        offset += 1
        return Origin(topic=topic, partition=0, offset=offset)

    for p in range(3):
        pid = f"p{p}"
        enrol = Enrollment(event_id=f"{pid}-enrol", event_time=START, patient_id=pid,
                           cohort=f"c{p % 2}", exposed=False)  # fmt: skip
        start = ExposureChange(event_id=f"{pid}-start", event_time=START + timedelta(days=100),
                               patient_id=pid, exposure=1.0)  # fmt: skip
        stop = ExposureChange(event_id=f"{pid}-stop", event_time=START + timedelta(days=280),
                              patient_id=pid, exposure=0.0)  # fmt: skip
        early = [EnrollmentRecord(event=enrol, origin=origin("enrollments")),
                 EnrollmentRecord(event=start, origin=origin("enrollments"))]  # fmt: skip
        stop_record = EnrollmentRecord(event=stop, origin=origin("enrollments"))
        readings = []
        for measure, family in (("symptom_today", "bernoulli"), ("rescue_inhaler_uses", "poisson")):
            times, values = _readings(rng, family, 300, 299.0)
            truth[(pid, measure)] = (times, values)
            for k, (t, v) in enumerate(zip(times, values, strict=True)):
                readings.append(Observation(
                    event_id=f"{pid}-{measure}-{k}", event_time=START + timedelta(days=float(t)),
                    patient_id=pid, measure=measure, value=float(v), unit="u", source="pro",
                    origin=origin("pros"),
                ))  # fmt: skip
        # Readings arrive in time order up to a local shuffle (the reorder
        # window), the stop after some of the readings it governs.
        order = sorted(readings, key=lambda o: o.event_time.timestamp() + rng.uniform(0, 5 * 86400))
        position = next(k for k, o in enumerate(order) if o.event_time > stop.event_time)
        order.insert(position + 6, stop_record)
        events.extend(early + order)
    first = events[:5]
    random.Random(shuffle_seed).shuffle(first)  # the enrolment may follow readings
    events[:5] = first
    records: dict[str, PatientRecord] = {}
    for position, event in enumerate(events):
        # Kafka delivers a partition in offset order: offsets follow arrival.
        event = event.model_copy(update={"origin": Origin(topic="t", partition=0, offset=position)})
        record, outcome = apply_event(records.get(event.patient_id), event, models)
        assert not outcome.rejected and not outcome.replays
        records[event.patient_id] = PatientRecord.model_validate_json(record.model_dump_json())

    for (pid, measure), (times, values) in truth.items():
        model = models[measure]
        day = times + days(START)
        exposure = ((times >= 100.0) & (times < 280.0)).astype(float)
        expected = family_stats_from_events(
            1, np.zeros(times.size, dtype=np.int64), exposure, day, values, model
        )
        stats = records[pid].measures[measure]
        assert len(stats.recent) <= 2 * RECENT_KEEP and stats.sealed_gram is not None
        np.testing.assert_allclose(stats.gram, expected.gram[0], rtol=1e-9, atol=1e-9)
        assert stats.reference_time == pytest.approx(day.max())
        assert stats.count_exposed == int(exposure.sum())
        assert stats.count_unexposed == int(times.size - exposure.sum())
        evidence = patient_evidence(records[pid], measure, model)
        assert evidence.gram == stats.gram and evidence.recent_gram is None


def test_the_book_fits_and_the_stream_scores_a_family_measure_as_the_offline_fit(tmp_path):
    """A simulated binary programme (40 patients, 4 cohorts, 30 readings each)
    through the population side: every patient's cells into the PopulationBook,
    the warm-started streaming fit, the published posterior message, and the
    scoring step (streams.scoring.measure_scores) on the declared odds-ratio
    scale, against the offline fit (model.offline.fit_programme, what ``efficacy
    fit --family`` runs) on the same readings.

    Tolerances: both are variational fits of the same Laplace likelihood with
    different keys and step schedules, summarised over DRAWS = 100 draws of θ
    each: their patient means differ by a fraction of a posterior sd (Monte
    Carlo error of each mixture's mean is ≲ 0.1 sd); a wrong likelihood, cell layout, scale or
    cohort posterior moves them by well over 1 sd (the effect's sign and size
    vary across patients: odds ratios from ~0.4 to ~4)."""
    from model.config import DecisionRule, SVIConfig
    from model.families import cell_stats
    from model.offline import fit_programme
    from model.simulate import ProgrammeSpec, simulate_family
    from streams.patient_state import MeasureStats
    from streams.population_book import PopulationBook, PopulationModel
    from streams.schemas import PatientEvidence
    from streams.scoring import MeasurePosterior, measure_scores

    loaded = catalogue(tmp_path)
    spec = loaded.get("symptom_today")
    model = models_of(tmp_path)["symptom_today"]
    sim = simulate_family(
        ProgrammeSpec(
            num_patients=40, num_cohorts=4, obs_per_patient=30, intercept=-0.5, effect=0.8,
            intercept_sd=0.7, effect_sd=0.6, cohort_effect_sd=0.3, correlation=-0.2,
            baseline_fraction=0.5,
        ),
        "bernoulli",
        seed=5,
    )  # fmt: skip
    events = sim.events
    cells = cell_stats(events.num_patients, events.patient, events.exposure, events.outcome,
                       "bernoulli")  # fmt: skip
    exposed = np.bincount(events.patient[events.exposure > 0], minlength=events.num_patients)
    total = np.bincount(events.patient, minlength=events.num_patients)
    book = PopulationBook("symptom_today", model)
    stats, cohorts = [], []
    for i in range(events.num_patients):
        cohort = f"c{events.cohort_of_patient[i]}"
        book.put(PatientEvidence(
            measure="symptom_today", patient_id=f"p{i}", cohort=cohort, gram=cells[i].tolist(),
            reference_time=20000.0, count_exposed=int(exposed[i]),
            count_unexposed=int(total[i] - exposed[i]),
        ))  # fmt: skip
        stats.append(MeasureStats(gram=cells[i].tolist(), reference_time=20000.0,
                                  count_exposed=int(exposed[i]),
                                  count_unexposed=int(total[i] - exposed[i])))  # fmt: skip
        cohorts.append(cohort)
    snapshot_stats, snapshot_cohort, labels = book.snapshot()
    np.testing.assert_array_equal(snapshot_stats.gram, cells)
    svi = SVIConfig(update_steps=100, num_draws=DRAWS)
    message = PopulationModel("symptom_today", model, svi).fit(snapshot_stats, snapshot_cohort,
                                                              labels).message  # fmt: skip
    assert np.asarray(message.draws["mu"]).shape == (DRAWS, 2)
    assert message.num_observations == pytest.approx(total.sum())
    assert "sigma" not in message.summary  # no residual sd for a family measure
    posterior = MeasurePosterior.from_message(
        type(message).model_validate_json(message.model_dump_json())  # through the topic's JSON
    )
    scores = measure_scores(posterior, stats, cohorts, [[]] * len(stats), spec, model,
                            DecisionRule())  # fmt: skip

    result, offline = fit_programme(events, spec.measure_config(), time_trend=False,
                                    svi_config=SVIConfig(num_draws=DRAWS))  # fmt: skip
    mean = np.array([s.effect.mean for s in scores])
    gap = np.abs(mean - offline.mean) / offline.sd
    assert np.median(gap) <= 0.35, np.median(gap)
    assert gap.max() <= 0.6, gap.max()
    p_gap = np.abs(np.array([s.p_benefit_ge_mcid for s in scores]) - offline.p_benefit_ge_mcid)
    assert np.median(p_gap) <= 0.03 and p_gap.max() <= 0.1, (np.median(p_gap), p_gap.max())
    assert all(s.effect_scale == "odds_ratio" and s.cohort_deviation is None for s in scores)
    effect = np.exp(np.asarray(message.draws["mu"])[:, 1])
    population = result["population"]["effect"]
    assert abs(effect.mean() - population["mean"]) <= 0.5 * population["sd"]
