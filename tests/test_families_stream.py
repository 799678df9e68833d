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

from model.evidence import stacked
from model.families import add_cell_reading, cell_stats, family_stats_from_events
from streams.app import measure_models
from streams.patient_state import RECENT_KEEP, PatientRecord, apply_event, days, patient_evidence
from streams.schemas import Enrollment, EnrollmentRecord, ExposureChange, Observation, Origin
from streams.settings import Settings
from tests.test_families_catalogue import catalogue, reading

SETTINGS = Settings(max_age_days=36500.0, partitions=2)
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
    cells, reference = bytes(8 * 5), -np.inf
    for k in np.flatnonzero(patient == 0):
        cells, reference = add_cell_reading(
            cells, reference, float(exposure[k] > 0), time[k], outcome[k], "poisson", 10.0
        )
    np.testing.assert_allclose(np.frombuffer(cells), stats.gram[0], rtol=1e-10)


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
        cells = stacked([stats.gram], model.stat_shape)[0]
        np.testing.assert_allclose(cells, expected.gram[0], rtol=1e-9, atol=1e-9)
        assert stats.reference_time == pytest.approx(day.max())
        assert stats.count_exposed == int(exposure.sum())
        assert stats.count_unexposed == int(times.size - exposure.sum())
        evidence = patient_evidence(records[pid], measure, model)
        assert evidence.gram == stats.gram  # forwarded as the record holds them
        assert evidence.recent_gram is None


MEASURES = {"symptom_today": "bernoulli", "rescue_inhaler_uses": "poisson"}
SPECS = {
    "bernoulli": dict(intercept=-0.5, effect=0.8, intercept_sd=0.7, effect_sd=0.6),
    "poisson": dict(intercept=0.3, effect=-0.5, intercept_sd=0.5, effect_sd=0.4),
}
PARTITIONS = 2


def family_programme(family: str, measure: str, prefix: str):
    """A simulated programme of one family (model.simulate.simulate_family: 30
    patients in 3 clinics, 24 readings each, baseline then exposure) as the raw
    records the worker reads: an enrolment (unexposed) and an exposure change
    just before each patient's first exposed reading, then the readings in time
    order, on the enrollments and pros topics (partition by key, offsets in
    order). Returns (records, simulated events, patient ids)."""
    from model.simulate import ProgrammeSpec, simulate_family
    from streams.chunked_consumer import ChunkRecord
    from streams.partitioning import key_partition

    spec = ProgrammeSpec(num_patients=30, num_cohorts=3, obs_per_patient=24,
                         cohort_effect_sd=0.3, correlation=-0.2, baseline_fraction=0.5,
                         **SPECS[family])  # fmt: skip
    events = simulate_family(spec, family, seed=7).events
    offsets: dict[tuple[str, int], int] = {}
    records = []

    def send(topic: str, patient: str, value: str) -> None:
        key = patient.encode()
        partition = key_partition(key, PARTITIONS)
        name = f"{SETTINGS.topic_prefix}{topic}"
        offset = offsets.get((name, partition), 0)
        offsets[(name, partition)] = offset + 1
        records.append(ChunkRecord(key, value.encode(), name, partition, offset, None))

    patients = [f"{prefix}-{i:02d}" for i in range(events.num_patients)]
    at = lambda day: (START + timedelta(days=float(day))).isoformat()  # noqa: E731
    for i, patient in enumerate(patients):
        mine = events.patient == i
        times, exposed = events.time[mine], events.exposure[mine] > 0
        assert times[~exposed].max() < times[exposed].min()  # baseline, then exposure
        enrol = Enrollment(event_id=f"{patient}-enrol", event_time=START, patient_id=patient,
                           cohort=f"clinic-{events.cohort_of_patient[i]}", exposed=False)  # fmt: skip
        send("enrollments", patient, enrol.model_dump_json())
        change = ExposureChange(event_id=f"{patient}-start", patient_id=patient, exposure=1.0,
                                event_time=at(times[exposed].min() - 1e-3))  # fmt: skip
        send("enrollments", patient, change.model_dump_json())
    for k in np.argsort(events.time, kind="stable"):
        patient = patients[events.patient[k]]
        send("pros", patient, (
            f'{{"event_id":"{patient}-r{k}","event_time":"{at(events.time[k])}",'
            f'"patient_id":"{patient}","measure":"{measure}","value":{events.outcome[k]:g},'
            f'"unit":"{"yes/no" if family == "bernoulli" else "uses"}"}}'
        ))  # fmt: skip
    return records, events, patients


@pytest.mark.parametrize("fitted", list(MEASURES))
def test_family_measures_through_the_stream_steps_score_as_the_offline_fit(tmp_path, fitted):
    """A binary and a count measure (``fitted``: the one fitted and scored) through the worker's pure steps (no Kafka):
    raw records -> process_batch (validation, patients' cells, evidence) ->
    PopulationBook -> the warm-started population fit -> its posterior message
    (through JSON) -> rescore (scores on the declared scales). Against the
    offline fit (model.offline.fit_programme, what ``efficacy fit --family``
    runs) on the same readings: every patient's effect and P(benefit ≥ MCID).
    Bad values (2 for the yes/no measure, -1 for the count) are dead-lettered as
    ``invalid_value`` with their origin, and nothing is lost.

    Tolerances: both are variational fits of the same Laplace likelihood with
    different keys and step schedules, summarised over DRAWS = 100 draws of θ
    each; their q(θ) differ by a fraction of a posterior sd, which moves every
    patient's mean the same way (measured: median gap 0.21 sd for the binary
    measure). A wrong likelihood, cell layout, scale or cohort posterior moves
    them by well over 1 sd (effects vary across patients by about 2 sd)."""
    import json

    from model.config import SVIConfig
    from model.offline import fit_programme
    from monitoring.drift import DriftConfig
    from streams.agents.population import (
        DriftDetectors,
        evidence_digest,
        fit_with_window,
        judge_drift,
    )
    from streams.chunked_consumer import ChunkRecord
    from streams.patient_step import StepContext, batch_keys, process_batch, rescore
    from streams.population_book import PopulationBook, PopulationModel
    from streams.posterior_feed import PosteriorBook
    from streams.schemas import EvidenceBatch, PopulationPosterior

    loaded = catalogue(tmp_path)
    models = measure_models(loaded, SETTINGS)
    records, programmes = [], {}
    for measure, family in MEASURES.items():
        part, events, patients = family_programme(family, measure, family[:3])
        records += part
        programmes[measure] = (events, patients)
    bad = []
    for k, (measure, value, unit) in enumerate(
        (("symptom_today", "2", "yes/no"), ("rescue_inhaler_uses", "-1", "uses"))
    ):
        value_bytes = reading(measure, value, unit).replace(b'"p"', b'"ber-00"')
        value_bytes = value_bytes.replace(b'"e"', f'"bad-{k}"'.encode())
        bad.append(ChunkRecord(b"ber-00", value_bytes, f"{SETTINGS.topic_prefix}pros",
                               key_partition_of(b"ber-00"), 10_000 + k, None))  # fmt: skip
    records += bad
    context = StepContext(loaded, models, PosteriorBook(), SETTINGS)
    states: dict[str, bytes] = {}
    outputs = []
    for start in range(0, len(records), 500):
        chunk = records[start : start + 500]
        saves, out = process_batch({k: states.get(k) for k in batch_keys(chunk)}, chunk, context)
        states.update(saves)
        outputs.append(out)
    letters = [json.loads(m.value) for o in outputs for m in o.dead_letters]
    assert sorted((x["reason"], x["offset"]) for x in letters) == [
        ("invalid_value", 10_000), ("invalid_value", 10_001)]  # fmt: skip
    assert all(x["source_topic"] == f"{SETTINGS.topic_prefix}pros" for x in letters)
    accepted = sum(sum(o.accepted.values()) for o in outputs)
    assert accepted + len(letters) == len(records)  # nothing lost

    posteriors = PosteriorBook()
    svi = SVIConfig(update_steps=100, num_draws=DRAWS)
    for measure, (events, patients) in programmes.items():
        if measure != fitted:
            continue
        model = models[measure]
        book = PopulationBook(measure, model)
        for o in outputs:
            for message in o.evidence:
                for item in EvidenceBatch.model_validate_json(message.value).items:
                    if item.measure == measure:
                        book.put(item)
        assert book.num_patients == len(patients)
        stats, cohort, cohorts = book.snapshot()
        cells = cell_stats(events.num_patients, events.patient, events.exposure,
                           events.outcome, MEASURES[measure])  # fmt: skip
        row = {p: r for r, p in enumerate(book.patient_ids)}
        np.testing.assert_allclose(stats.gram[[row[p] for p in patients]], cells, rtol=1e-12)
        # As the population agent fits: the evidence digest, the fit (no recent
        # window for a family measure) and the drift verdict.
        assert book.recent_snapshot() is None
        digest = evidence_digest(stats, cohort, cohorts, book.covariates_snapshot())
        result, recent = fit_with_window(
            PopulationModel(measure, model, svi), None, stats, None, cohort, cohorts
        )
        assert recent is None
        message = result.message.model_copy(update={"evidence_digest": digest})
        message = judge_drift(DriftDetectors.from_config(DriftConfig()), message, recent)
        assert message.drift_kinds == []
        assert message.num_observations == pytest.approx(events.patient.size)
        assert "sigma" not in message.summary  # no residual sd for a family measure
        posteriors.offer(PopulationPosterior.model_validate_json(message.model_dump_json()))

    context = StepContext(loaded, models, posteriors, SETTINGS)
    for measure, (events, patients) in programmes.items():
        if measure != fitted:
            continue
        spec = loaded.get(measure)
        _, out = rescore(states, measure, context, force=True)
        scores = {}
        for m in out.scores:
            (score,) = json.loads(m.value)["measures"]
            scores[m.key.decode()] = score
        assert set(scores) == set(patients)
        scale = spec.effect_scale or ("rate_ratio" if MEASURES[measure] == "poisson" else None)
        assert all(s["effect_scale"] == scale and s["cohort_deviation"] is None
                   for s in scores.values())  # fmt: skip
        _, offline = fit_programme(events, spec.measure_config(), time_trend=False,
                                   svi_config=SVIConfig(num_draws=DRAWS))  # fmt: skip
        mean = np.array([scores[p]["effect"]["mean"] for p in patients])
        gap = np.abs(mean - offline.mean) / offline.sd
        assert np.median(gap) <= 0.35 and gap.max() <= 0.6, (measure, np.median(gap), gap.max())
        p_mcid = np.array([scores[p]["p_benefit_ge_mcid"] for p in patients])
        p_gap = np.abs(p_mcid - offline.p_benefit_ge_mcid)
        assert np.median(p_gap) <= 0.03 and p_gap.max() <= 0.1, (measure, p_gap.max())


def key_partition_of(key: bytes) -> int:
    from streams.partitioning import key_partition

    return key_partition(key, PARTITIONS)
