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
  events; every patient is in the one cohort clinic-0, whose u_g posterior the
  reference computes from all 24 patients as the stream's fit did): the same
  function of the same numbers, the Gram matrices summed in another order,
  so 1e-6 of a posterior sd and 1e-6 in probability.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from e2e_setup import JointSettling, catalogue_run
from test_families_e2e import send
from test_joint_stream import GROUP, MEASURES, PATIENTS, SHIPPED, raw_records, stream_programme

from cli.kafka_io import read_until
from cli.worker_process import WorkerProcess
from model.joint import joint_grams, joint_patients
from streams.app import measure_models
from streams.joint_stream import joint_models, message_config, posterior_draws

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("joint")
    catalogue, _, prefix, env, settings = catalogue_run(
        kafka_bootstrap, directory, SHIPPED.read_text() + GROUP, "joint"
    )
    events, patients = stream_programme(settings.time_origin)
    sends = raw_records(events, patients, settings.time_origin, prefix)
    settling = JointSettling(prefix, patients, [e.patient.size for e in events], "glycaemic")
    topics = settling.topics

    with WorkerProcess(env) as worker:
        asyncio.run(send(settings, sends))
        found = asyncio.run(read_until(kafka_bootstrap, topics, settling.settled, timeout=600))
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settling.settled(found), log
    config = joint_models(catalogue, measure_models(catalogue, settings))["glycaemic"]
    return events, patients, found, topics, settling.final(found), config


def test_the_joint_posterior_covers_every_reading_with_the_correlation(run):
    events, _, _, _, posterior, _ = run
    assert posterior.measures == list(MEASURES)
    assert posterior.num_patients == PATIENTS
    assert posterior.num_observations == pytest.approx([e.patient.size for e in events])
    correlation = np.asarray(posterior.effect_correlation["mean"])
    assert correlation.shape == (2, 2) and np.allclose(np.diag(correlation), 1.0)
    lower, upper = (np.asarray(posterior.effect_correlation[q]) for q in ("q05", "q95"))
    assert np.all(lower <= correlation + 1e-12) and np.all(correlation <= upper + 1e-12)
    # the benefits' common factor, under the catalogue's directions (both lower is
    # better, the effects correlate 0.6: one factor loading positively on both)
    factor = posterior.effect_factor
    assert 0.5 <= factor["variance_share"]["mean"] <= 1.0
    assert len(factor["loadings"]["mean"]) == 2 and min(factor["loadings"]["mean"]) > 0
    assert set(posterior.summary) == {
        f"{kind}_{m}" for kind in ("effect", "effect_sd_patients") for m in MEASURES
    }


def test_every_patient_joint_score_equals_the_offline_computation(run):
    events, patients, found, topics, posterior, config = run
    latest = {r.key.decode(): json.loads(r.value) for r in found if r.topic == topics[1]}
    counts = [np.bincount(e.patient, minlength=PATIENTS) for e in events]
    config = message_config(posterior, config)
    assert config.cohort_level and posterior.cohorts == ["clinic-0"]
    reference = joint_patients(
        posterior_draws(posterior),
        joint_grams(events, config),
        config,
        np.array([-1.0, -1.0]),
        cohort=np.zeros(PATIENTS, dtype=np.int32),
        num_cohorts=1,
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
