"""Several grouping levels end to end on the real broker (issue 15 item 7).

One worker subprocess with a catalogue in which resting heart rate has a
further grouping level, ``cluster`` (an enrolment attribute, crossed with the
clinics, missing for some patients); enrolments with bad cluster values are
sent next to the programme (tests/test_groups_stream.py's). Checked on the
topics:

- every bad value is dead-lettered as invalid_group with the producer's bytes,
  and accepted + dead-lettered = produced;
- the final population posterior covers every reading, names the level and its
  groups (the missing attribute's group "" among them) and carries the groups'
  posterior under every draw in the shapes the message documents;
- every patient is scored, and a patient's score under the final posterior
  equals the batch scoring under its draws (model.scores.summarize_effects on
  the batch statistics and groups).
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from e2e_setup import catalogue_run
from test_groups_stream import CLUSTERS, MEASURE, bad_enrolments, with_clusters

from cli.kafka_io import read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from model.scores import summarize_effects
from streams.app import measure_models
from streams.catalogue import DEFAULT_CATALOGUE
from streams.kafka_options import aiokafka_options, start_client
from streams.schemas import MISSING_GROUP, PopulationPosterior
from streams.scoring import MeasurePosterior
from streams.settings import Settings

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("groups")
    text = DEFAULT_CATALOGUE.read_text().replace(
        f"\n[{MEASURE}]\n", f'\n[{MEASURE}]\ngrouping_levels = ["cluster"]\n', 1
    )
    catalogue, _, prefix, env, settings = catalogue_run(kafka_bootstrap, directory, text, "grp")
    simulated = build_programme(
        [MEASURE], catalogue=catalogue, num_patients=80, num_cohorts=4, obs_per_patient=12,
        seed=37,
    )  # fmt: skip
    programme, cluster_of = with_clusters(simulated, seed=37)
    valid = programme.truth.measures[MEASURE].valid_unique_readings
    bad = bad_enrolments(0)
    topics = [prefix + "population-posterior", prefix + "scores"]

    def settled(records) -> bool:
        posteriors = [json.loads(r.value) for r in records if r.topic == topics[0]]
        final = max(posteriors, key=lambda p: p["version"], default=None)
        scored = {r.key for r in records if r.topic == topics[1]}
        return (
            final is not None
            and round(final["num_observations"]) == valid
            and len(scored) == len(programme.truth.patients)
        )

    with WorkerProcess(env) as worker:
        asyncio.run(publish(programme, settings))
        asyncio.run(send_bad(settings, prefix, bad))
        records = asyncio.run(read_until(kafka_bootstrap, topics, settled, timeout=600))
        letters = asyncio.run(
            read_until(kafka_bootstrap, [prefix + "deadletter"],
                       lambda rs: len(rs) >= len(bad), timeout=60)
        )  # fmt: skip
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settled(records), log
    model = measure_models(catalogue, settings)[MEASURE]
    return programme, cluster_of, bad, records, letters, topics, catalogue, model


async def send_bad(settings: Settings, prefix: str, records) -> None:
    producer = AIOKafkaProducer(**aiokafka_options(settings))
    await start_client(producer, settings)
    try:
        for record in records:
            await producer.send_and_wait(prefix + "enrollments", record.value, key=record.key)
    finally:
        await producer.stop()


def test_bad_groups_are_dead_lettered_with_their_reason(run):
    programme, _, bad, _, letters, *_ = run
    values = [json.loads(r.value) for r in letters]
    assert [v["reason"] for v in values] == ["invalid_group"] * len(bad)
    assert {base64.b64decode(v["value_b64"]) for v in values} == {r.value for r in bad}
    truth = programme.truth
    produced = sum(s.records for s in truth.sent.values()) + len(bad)
    assert truth.enrollment_events + truth.valid_unique_readings + len(values) == produced


def test_the_posterior_carries_the_levels_and_the_scores_follow_it(run):
    programme, cluster_of, _, records, _, topics, catalogue, model = run
    final = max(
        (PopulationPosterior.model_validate_json(r.value) for r in records if r.topic == topics[0]),
        key=lambda p: p.version,
    )
    assert final.group_levels == ["cluster"]
    assert sorted(final.groups[0]) == sorted([*CLUSTERS, MISSING_GROUP])
    draws = len(final.draws["mu"])
    assert np.shape(final.group_mean) == (draws, len(final.groups[0]))
    assert np.shape(final.group_cross_cov) == (1, draws, len(final.cohorts), len(final.groups[0]))
    assert "effect_sd_cluster" in final.summary

    # Each patient's latest score against the batch scoring under the posterior
    # it names (a posterior that did not move materially republishes only the
    # scores that changed), for the scores resting on all the patient's readings
    # under a posterior fitted on every reading.
    posteriors = {
        message.version: message
        for message in (
            PopulationPosterior.model_validate_json(r.value)
            for r in records
            if r.topic == topics[0]
        )
    }
    latest = {}
    for r in records:
        if r.topic == topics[1]:
            latest[r.key.decode()] = json.loads(r.value)["measures"][0]
    patients = sorted(programme.truth.patients)
    assert set(latest) == set(patients)
    valid = programme.truth.measures[MEASURE].valid_unique_readings
    batch = programme.expected_statistics(MEASURE, model, patients)
    truth = programme.truth.patients
    cohorts = sorted({truth[p].cohort for p in patients})
    clusters = sorted({cluster_of[p] or MISSING_GROUP for p in patients})
    references = {}
    complete = 0
    for i, p in enumerate(patients):
        score = latest[p]
        readings = score["count_exposed"] + score["count_unexposed"]
        if readings != truth[p].valid_unique_readings[MEASURE]:
            continue  # scored on part of its evidence: not the batch's
        version = score["population_version"]
        if round(posteriors[version].num_observations) != valid:
            continue  # fitted before every reading had arrived
        if version not in references:
            references[version] = summarize_effects(
                MeasurePosterior.from_message(posteriors[version]).draws, batch.gram,
                np.array([cohorts.index(truth[q].cohort) for q in patients]), len(cohorts),
                catalogue.get(MEASURE).measure_config(), model,
                groups=np.array([[clusters.index(cluster_of[q] or MISSING_GROUP)]
                                 for q in patients]),
                num_groups=(len(clusters),),
            )  # fmt: skip
        reference = references[version]
        complete += 1
        sd = reference.sd[i]
        assert abs(score["effect"]["mean"] - reference.mean[i]) <= 1e-9 * sd, (p, version)
        assert abs(score["effect"]["sd"] - sd) <= 1e-9 * sd, (p, version)
        assert abs(score["p_benefit_ge_mcid"] - reference.p_benefit_ge_mcid[i]) <= 1e-5
    # The first posteriors rescore every patient (the drift detector's warm-up),
    # so most latest scores rest on all the evidence (measured: 80 of 80).
    assert complete >= len(patients) // 2, complete
