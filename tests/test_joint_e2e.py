"""Joint scores end to end on the real broker.

One worker subprocess with the shipped catalogue plus a joint group of HbA1c
and fasting glucose (``[joint.glycaemic]``). A simulated programme
(model.simulate.simulate_joint: 24 patients, effects correlated 0.6, some
patients without one of the measures) is produced to the enrollments and labs
topics: an enrolment (unexposed), an exposure change at day 15 and the
readings, unexposed ones before it. Checked on the topics:

- the joint group's posterior is published (key ``joint:glycaemic``) and its
  final version covers every reading of both measures, with the effects'
  between-measure correlation and each measure's population effect;
- every patient's latest score carries the group's joint score, and where it
  rests on all the patient's readings under that final posterior it equals the
  offline computation on the same draws and the patient's evidence
  (model.joint.joint_patients on model.joint.joint_grams of the simulated
  events): the same function of the same numbers, the Gram matrices summed in
  another order, so 1e-6 of a posterior sd and 1e-6 in probability.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import timedelta

import numpy as np
import pytest
from test_families_e2e import send
from test_joint_stream import GROUP, SHIPPED

from cli.kafka_io import read_until
from cli.worker_process import WorkerProcess
from model.joint import joint_grams, joint_patients
from model.simulate import simulate_joint
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.joint_stream import joint_models, message_config, posterior_draws, posterior_key
from streams.schemas import Enrollment, ExposureChange, JointPosterior, LabResult
from streams.settings import Settings

pytestmark = pytest.mark.kafka
MEASURES = ("hba1c", "fasting_glucose")
UNITS = ("%", "mg/dL")
PATIENTS = 24


def programme(origin):
    """Readings per patient of both measures (a few patients lack one), the
    simulated events with stream times (days since the epoch: unexposed readings
    in days 0-15 of the programme, exposed in days 15-30) and the patient ids."""
    rng = np.random.default_rng(11)
    readings = rng.integers(4, 9, size=(PATIENTS, 2))
    readings[[3, 10], 0] = 0
    readings[[7], 1] = 0
    events, _truth = simulate_joint(
        readings,
        effect_mean=np.array([-0.6, -15.0]),
        effect_sd=np.array([0.4, 10.0]),
        effect_correlation=0.6,
        intercept_mean=np.array([7.5, 130.0]),
        intercept_sd=np.array([1.0, 25.0]),
        residual_sd=np.array([0.4, 12.0]),
        seed=4,
    )
    start = origin.timestamp() / 86400.0
    timed = []
    for each in events:
        u = rng.uniform(0.0, 15.0, each.patient.size)
        timed.append(dataclasses.replace(each, time=start + u + 15.0 * (each.exposure > 0)))
    return timed, [f"joint-{i:02d}" for i in range(PATIENTS)]


def records(events, patients, origin, prefix):
    sends = []
    for patient in patients:
        enrol = Enrollment(event_id=f"{patient}-enrol", event_time=origin, patient_id=patient,
                           cohort="clinic-0", exposed=False)  # fmt: skip
        change = ExposureChange(event_id=f"{patient}-start", patient_id=patient, exposure=1.0,
                                event_time=origin + timedelta(days=15.0))  # fmt: skip
        for message in (enrol, change):
            sends.append((prefix + "enrollments", patient.encode(), message.model_dump_json()))
    readings = []
    for m, each in enumerate(events):
        for k in range(each.patient.size):
            patient = patients[each.patient[k]]
            lab = LabResult(
                event_id=f"{patient}-{MEASURES[m]}-{k}", patient_id=patient,
                event_time=origin + timedelta(days=float(each.time[k]) - origin.timestamp() / 86400.0),
                measure=MEASURES[m], value=float(each.outcome[k]), unit=UNITS[m],
            )  # fmt: skip
            readings.append(
                (each.time[k], (prefix + "labs", patient.encode(), lab.model_dump_json()))
            )
    readings.sort(key=lambda pair: pair[0])
    sends += [record for _, record in readings]
    return [(topic, key, value.encode()) for topic, key, value in sends]


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("joint")
    catalogue_file = directory / "measures.toml"
    catalogue_file.write_text(SHIPPED.read_text() + GROUP)
    catalogue = Catalogue.load(catalogue_file)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"joint-{run_id}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"joint-{run_id}",
        "EFFICACY_PARTITIONS": "2",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(directory / "data"),
        "EFFICACY_MEASURES_FILE": str(catalogue_file),
        "EFFICACY_MAX_AGE_DAYS": "36500",
    }
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=2,
        app_id=env["EFFICACY_APP_ID"], measures_file=catalogue_file, max_age_days=36500.0,
    )  # fmt: skip
    events, patients = programme(settings.time_origin)
    sends = records(events, patients, settings.time_origin, prefix)
    topics = [prefix + "population-posterior", prefix + "scores"]
    totals = [each.patient.size for each in events]

    def final(found) -> JointPosterior | None:
        joint = [
            JointPosterior.model_validate_json(r.value)
            for r in found
            if r.topic == topics[0] and r.key.decode() == posterior_key("glycaemic")
        ]
        latest = max(joint, key=lambda p: p.version, default=None)
        if latest is None or [round(n) for n in latest.num_observations] != totals:
            return None
        return latest

    def settled(found) -> bool:
        posterior = final(found)
        if posterior is None:
            return False
        latest = {r.key.decode(): json.loads(r.value) for r in found if r.topic == topics[1]}
        return all(
            p in latest
            and any(
                j["group"] == "glycaemic" and j["population_version"] == posterior.version
                for j in latest[p]["joint"]
            )
            for p in patients
        )

    with WorkerProcess(env) as worker:
        asyncio.run(send(settings, sends))
        found = asyncio.run(read_until(kafka_bootstrap, topics, settled, timeout=600))
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settled(found), log
    config = joint_models(catalogue, measure_models(catalogue, settings))["glycaemic"]
    return events, patients, found, topics, final(found), config


def test_the_joint_posterior_covers_every_reading_with_the_correlation(run):
    events, _, _, _, posterior, _ = run
    assert posterior.measures == list(MEASURES)
    assert posterior.num_patients == PATIENTS
    assert posterior.num_observations == pytest.approx([e.patient.size for e in events])
    correlation = np.asarray(posterior.effect_correlation["mean"])
    assert correlation.shape == (2, 2) and np.allclose(np.diag(correlation), 1.0)
    lower, upper = (np.asarray(posterior.effect_correlation[q]) for q in ("q05", "q95"))
    assert np.all(lower <= correlation + 1e-12) and np.all(correlation <= upper + 1e-12)
    assert set(posterior.summary) == {
        f"{kind}_{m}" for kind in ("effect", "effect_sd_patients") for m in MEASURES
    }


def test_every_patient_joint_score_equals_the_offline_computation(run):
    events, patients, found, topics, posterior, config = run
    latest = {r.key.decode(): json.loads(r.value) for r in found if r.topic == topics[1]}
    counts = [np.bincount(e.patient, minlength=PATIENTS) for e in events]
    config = message_config(posterior, config)
    reference = joint_patients(
        posterior_draws(posterior), joint_grams(events, config), config, np.array([-1.0, -1.0])
    )
    scales = [m.standardization.outcome_scale for m in config.measures]
    compared = 0
    for i, patient in enumerate(patients):
        score = latest[patient]
        (joint,) = [j for j in score["joint"] if j["group"] == "glycaemic"]
        assert joint["population_version"] == posterior.version
        seen = {s["measure"]: s["count_exposed"] + s["count_unexposed"] for s in score["measures"]}
        if any(seen.get(m, 0) != counts[k][i] for k, m in enumerate(MEASURES)):
            continue  # scored on part of the patient's readings
        compared += 1
        for m, effect in enumerate(joint["effects"]):
            sd = reference.effect_sd[i, m] * scales[m]
            assert effect["measure"] == MEASURES[m]
            for field, want in (
                ("mean", reference.effect_mean[i, m]),
                ("sd", reference.effect_sd[i, m]),
                ("lower", reference.effect_lower[i, m]),
                ("upper", reference.effect_upper[i, m]),
            ):
                assert abs(effect["effect"][field] - want * scales[m]) <= 1e-6 * sd, (patient, m)
        rho = joint["responsiveness"]
        sd = reference.responsiveness_sd[i]
        assert abs(rho["mean"] - reference.responsiveness_mean[i]) <= 1e-6 * sd
        assert abs(rho["sd"] - sd) <= 1e-6 * sd
        assert abs(rho["lower"] - reference.responsiveness_lower[i]) <= 1e-6 * sd
        assert abs(rho["upper"] - reference.responsiveness_upper[i]) <= 1e-6 * sd
        assert abs(joint["p_above_population"] - reference.p_above_population[i]) <= 1e-6
    assert compared == PATIENTS
