"""Binary and count measures end to end on the real broker (issue 16).

One worker subprocess with a catalogue of a yes/no measure (Bernoulli, odds
ratio) and a count measure (Poisson, rate ratio); the simulated programmes of
tests/test_families_stream.py are produced to the enrollments and pros topics,
with a 2 for the yes/no measure and a -1 for the count. Checked on the topics:

- both bad values are dead-lettered as invalid_value with the producer's bytes
  and their origin; accepted + dead-lettered = produced (every reading is in
  the final posteriors, every patient scored);
- each measure's final population posterior covers every reading;
- every patient's latest score that rests on all its readings under a
  posterior fitted on all readings equals the offline summary of the same cells
  under that posterior's draws (model.family_scores.summarize_family_effects,
  what ``efficacy fit --family`` reports): 1e-3 of a posterior sd and 1e-3 in
  probability, the Newton searches' convergence (tests/test_family_scores.py
  measures 1e-4 on smaller problems).
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from e2e_setup import catalogue_run
from test_families_catalogue import ENTRIES, reading
from test_families_stream import MEASURES, SETTINGS, family_programme

from cli.kafka_io import read_until
from cli.worker_process import WorkerProcess
from model.families import cell_stats
from model.family_scores import summarize_family_effects
from streams.app import measure_models
from streams.kafka_options import aiokafka_options, start_client
from streams.schemas import PopulationPosterior
from streams.scoring import MeasurePosterior
from streams.settings import Settings
from streams.topics import ensure_topics

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("families")
    catalogue, _, prefix, env, settings = catalogue_run(kafka_bootstrap, directory, ENTRIES, "fam")
    programmes, sends = {}, []
    for measure, family in MEASURES.items():
        records, events, patients = family_programme(family, measure, family[:3])
        programmes[measure] = (events, patients)
        for r in records:
            sends.append((prefix + r.topic.removeprefix(SETTINGS.topic_prefix), r.key, r.value))
    bad = [
        (b"ber-00", reading("symptom_today", "2", "yes/no").replace(b'"p"', b'"ber-00"')),
        (b"poi-00", reading("rescue_inhaler_uses", "-1", "uses").replace(b'"p"', b'"poi-00"')),
    ]
    bad = [(key, value.replace(b'"e"', f'"bad-{k}"'.encode())) for k, (key, value) in
           enumerate(bad)]  # fmt: skip
    sends += [(prefix + "pros", key, value) for key, value in bad]
    topics = [prefix + "population-posterior", prefix + "scores"]

    def settled(records) -> bool:
        for measure, (events, patients) in programmes.items():
            posteriors = [
                json.loads(r.value)
                for r in records
                if r.topic == topics[0] and r.key.decode() == measure
            ]
            final = max(posteriors, key=lambda p: p["version"], default=None)
            if final is None or round(final["num_observations"]) != events.patient.size:
                return False
            scored = {
                r.key.decode()
                for r in records
                if r.topic == topics[1]
                and any(m["measure"] == measure for m in json.loads(r.value)["measures"])
            }
            if not set(patients) <= scored:
                return False
        return True

    with WorkerProcess(env) as worker:
        asyncio.run(send(settings, sends))
        records = asyncio.run(read_until(kafka_bootstrap, topics, settled, timeout=600))
        letters = asyncio.run(
            read_until(kafka_bootstrap, [prefix + "deadletter"],
                       lambda rs: len(rs) >= len(bad), timeout=60)
        )  # fmt: skip
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settled(records), log
    models = measure_models(catalogue, settings)
    return programmes, bad, sends, records, letters, topics, catalogue, models, prefix


async def send(settings: Settings, sends) -> None:
    await ensure_topics(settings)  # with the worker's partition counts, as efficacy simulate
    producer = AIOKafkaProducer(**aiokafka_options(settings))
    await start_client(producer, settings)
    try:
        for topic, key, value in sends:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def test_bad_values_are_dead_lettered_with_reason_and_origin_and_nothing_is_lost(run):
    programmes, bad, sends, _, letters, *_, prefix = run
    values = [json.loads(r.value) for r in letters]
    assert [v["reason"] for v in values] == ["invalid_value"] * len(bad)
    assert {base64.b64decode(v["value_b64"]) for v in values} == {value for _, value in bad}
    assert {v["source_topic"] for v in values} == {prefix + "pros"}
    assert all(v["offset"] >= 0 for v in values)
    # Every reading is in its measure's final posterior, every patient enrolled
    # and scored (the fixture's settled), and the rest was dead-lettered.
    readings = sum(events.patient.size for events, _ in programmes.values())
    enrolments = sum(2 * len(patients) for _, patients in programmes.values())
    assert readings + enrolments + len(values) == len(sends)


def test_scores_follow_the_posterior_on_the_declared_scale(run):
    programmes, _, _, records, _, topics, catalogue, models, _ = run
    posteriors = {}
    for r in records:
        if r.topic == topics[0]:
            message = PopulationPosterior.model_validate_json(r.value)
            posteriors[(message.measure, message.version)] = message
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.topic == topics[1]:
            for score in json.loads(r.value)["measures"]:
                latest[(score["measure"], r.key.decode())] = score
    for measure, (events, patients) in programmes.items():
        spec, model = catalogue.get(measure), models[measure]
        cells = cell_stats(
            events.num_patients, events.patient, events.exposure, events.outcome, model.family
        )
        counts = np.bincount(events.patient, minlength=events.num_patients)
        references = {}
        complete = 0
        for i, p in enumerate(patients):
            score = latest[(measure, p)]
            assert score["effect_scale"] == ("odds_ratio" if model.family == "bernoulli"
                                             else "rate_ratio")  # fmt: skip
            assert score["cohort_deviation"] is None
            if score["count_exposed"] + score["count_unexposed"] != counts[i]:
                continue  # scored on part of its evidence
            version = score["population_version"]
            posterior = posteriors[(measure, version)]
            if round(posterior.num_observations) != events.patient.size:
                continue  # fitted before every reading had arrived
            if version not in references:
                index = {c: g for g, c in enumerate(posterior.cohorts)}
                cohort = np.array(
                    [index[f"clinic-{events.cohort_of_patient[j]}"] for j in range(len(patients))]
                )
                references[version] = summarize_family_effects(
                    MeasurePosterior.from_message(posterior).draws, cells, cohort,
                    len(posterior.cohorts), spec.measure_config(), model,
                )  # fmt: skip
            reference = references[version]
            complete += 1
            sd = reference.sd[i]
            assert abs(score["effect"]["mean"] - reference.mean[i]) <= 1e-3 * sd, (p, version)
            assert abs(score["effect"]["sd"] - sd) <= 1e-3 * sd, (p, version)
            assert abs(score["p_benefit_ge_mcid"] - reference.p_benefit_ge_mcid[i]) <= 1e-3
        assert complete >= len(patients) // 2, (measure, complete)
