"""Who it works for, end to end on the real broker (issue 15).

One worker subprocess with a catalogue that declares age and group (baseline
covariates), activity (a time-varying covariate every reading carries) and two
subgroups. The programme's enrolments carry the covariates; its readings carry
their adherence (doses in [0.5, 1]) and activity, which rises with exposure
(a confounder). Bad covariates are sent next to it. Checked on the topics:

- every bad covariate is dead-lettered as invalid_covariate with the producer's
  bytes, and accepted + dead-lettered = produced;
- the final population posterior covers every reading and publishes the effect
  modifiers, each covering the simulation's true value;
- both subgroups get a score on subgroup-scores under that posterior, each
  covering the mean of its members' true effects, and the subgroup where the
  programme works is called ``works``;
- the measure declares age smooth and a daily cycle (catalogue ``smooth``,
  ``daily_cycle``; its readings follow the clock): the final posterior carries
  the age curve and the daily cycle with their 90% bands, covering the truth.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from e2e_setup import catalogue_run

from cli.kafka_io import read_until
from cli.programme import SIMULATED_COVARIATES, build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from model.simulate import true_daily_cycle, true_effect_at
from streams.catalogue import DEFAULT_CATALOGUE
from streams.kafka_options import aiokafka_options, start_client
from streams.schemas import Enrollment, WearableReading
from streams.settings import Settings

pytestmark = pytest.mark.kafka
MEASURE = "resting_heart_rate"
EFFECT_PER_YEAR = 0.15
GROUP_B = -5.0
SUBGROUPS = """
[subgroups.group-a]
levels = { group = ["A"] }

[subgroups.group-b]
levels = { group = ["B"] }
"""
#: The measure's effect of age is a curve and its readings follow the clock
#: (docs/covariates.md, "Smooth terms in the stream").
SMOOTH_ENTRY = '\n[resting_heart_rate]\nsmooth = ["age"]\ndaily_cycle = 2\n'
DAILY_AMPLITUDES = (4.0, 1.5)  # bpm: tests/test_smooth.py's wearable
BAD = [  # (key, record, the detail's words)
    ("bad-age", Enrollment(event_id="bad-1", event_time="2026-01-02T00:00:00Z",
                           patient_id="bad-age", cohort="clinic-0",
                           covariates={"age": 300.0, "group": "A"}), "outside its plausible"),
    ("bad-group", Enrollment(event_id="bad-2", event_time="2026-01-02T00:00:00Z",
                             patient_id="bad-group", cohort="clinic-0",
                             covariates={"age": 40.0, "group": "Z"}), "unknown level 'Z'"),
    ("no-age", Enrollment(event_id="bad-3", event_time="2026-01-02T00:00:00Z",
                          patient_id="no-age", cohort="clinic-0",
                          covariates={"group": "B"}), "'age' is required"),
    ("patient-000", WearableReading(event_id="bad-4", event_time="2026-01-20T00:00:00Z",
                                    patient_id="patient-000", measure=MEASURE, value=70.0,
                                    unit="bpm", covariates={"steps": 3.0}), "'steps'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    directory = tmp_path_factory.mktemp("covariates")
    catalogue, _, prefix, env, settings = catalogue_run(
        kafka_bootstrap,
        directory,
        DEFAULT_CATALOGUE.read_text().replace("\n[resting_heart_rate]\n", SMOOTH_ENTRY)
        + SIMULATED_COVARIATES
        + SUBGROUPS,
        "cov",
    )
    programme = build_programme(
        [MEASURE], catalogue=catalogue, num_patients=120, num_cohorts=4, obs_per_patient=16,
        seed=31, spec_overrides={MEASURE: {
            "with_covariates": True, "effect_per_year": EFFECT_PER_YEAR,
            "group_effects": (GROUP_B,), "adherence_low": 0.5, "time_covariate_effect": 2.0,
            "time_covariate_confounding": 1.0, "daily_amplitudes": DAILY_AMPLITUDES,
        }},
    )  # fmt: skip
    assert catalogue.get(MEASURE).smooth == ("age",)
    valid = programme.truth.measures[MEASURE].valid_unique_readings
    posterior_topic, subgroup_topic = prefix + "population-posterior", prefix + "subgroup-scores"

    def settled(records) -> bool:
        posteriors = [json.loads(r.value) for r in records if r.topic == posterior_topic]
        final = max(posteriors, key=lambda p: p["version"], default=None)
        if final is None or round(final["num_observations"]) != valid:
            return False
        under = {json.loads(r.value)["subgroup"] for r in records if r.topic == subgroup_topic
                 and json.loads(r.value)["population_version"] == final["version"]}  # fmt: skip
        return under == {"group-a", "group-b"}

    with WorkerProcess(env) as worker:
        asyncio.run(publish(programme, settings))
        asyncio.run(send_bad(settings, prefix))
        records = asyncio.run(
            read_until(kafka_bootstrap, [posterior_topic, subgroup_topic], settled, timeout=600)
        )
        letters = asyncio.run(
            read_until(kafka_bootstrap, [prefix + "deadletter"],
                       lambda rs: len(rs) >= len(BAD), timeout=60)
        )  # fmt: skip
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settled(records), log
    return programme, records, letters, posterior_topic, subgroup_topic


async def send_bad(settings: Settings, prefix: str) -> None:
    producer = AIOKafkaProducer(**aiokafka_options(settings))
    await start_client(producer, settings)
    try:
        for key, record, _ in BAD:
            topic = "enrollments" if isinstance(record, Enrollment) else "wearables"
            await producer.send_and_wait(
                prefix + topic, record.model_dump_json().encode(), key=key.encode()
            )
    finally:
        await producer.stop()


def test_bad_covariates_are_dead_lettered_with_their_reason(run):
    programme, _, letters, _, _ = run
    values = [json.loads(r.value) for r in letters]
    assert [v["reason"] for v in values] == ["invalid_covariate"] * len(BAD)
    sent = {bytes(r.model_dump_json(), "utf-8"): words for _, r, words in BAD}
    for letter in values:
        words = sent[base64.b64decode(letter["value_b64"])]
        assert words in letter["detail"], letter
    truth = programme.truth
    produced = sum(s.records for s in truth.sent.values()) + len(BAD)
    assert truth.enrollment_events + truth.valid_unique_readings + len(values) == produced


def test_the_posterior_publishes_effect_modifiers_covering_the_truth(run):
    _, records, _, posterior_topic, _ = run
    final = max(
        (json.loads(r.value) for r in records if r.topic == posterior_topic),
        key=lambda p: p["version"],
    )
    modifiers = {c["covariate"]: c["effect"] for c in final["coefficients"]}
    splines = {f"age:s{k}" for k in range(1, 7)}  # age is smooth: its spline columns
    assert set(modifiers) == {"age", "group=B", *splines}
    for name, true_value in (("age", EFFECT_PER_YEAR), ("group=B", GROUP_B)):
        assert modifiers[name]["lower"] <= true_value <= modifiers[name]["upper"], modifiers
    assert np.asarray(final["draws"]["coef"]).shape == (len(final["draws"]["mu"]), 2, 8)


def test_the_posterior_publishes_the_curves_covering_the_truth(run):
    """The age curve (true: linear, 0.15 bpm per year) and the daily cycle
    (amplitudes 4 and 1.5 bpm) on the topic, in the fit JSON's shape. Seeded;
    the age band covers the true expected effect on ≥ 75% of its 41 points (one
    programme: the points share one fit, tests/test_smooth.py); the cycle's
    90% band covers the truth on ≥ 75% of its points and its mean is within 1
    bpm everywhere (about 1 900 readings of sd 4: a point's sd ≈ 0.3 bpm; the
    offline test allows 0.6 with three times the readings)."""
    programme, records, _, posterior_topic, _ = run
    final = max(
        (json.loads(r.value) for r in records if r.topic == posterior_topic),
        key=lambda p: p["version"],
    )
    spec = programme.simulated[MEASURE].spec
    (curve,) = final["curves"]
    assert curve["covariate"] == "age" and len(curve["grid"]) == 41
    truth = true_effect_at(spec, np.asarray(curve["grid"]))
    low, high = np.asarray(curve["effect"]["q05"]), np.asarray(curve["effect"]["q95"])
    assert np.mean((low <= truth) & (truth <= high)) >= 0.75, (curve, truth)
    cycle = final["daily_cycle"]
    truth = true_daily_cycle(spec, np.asarray(cycle["hour"]))
    covered = (np.asarray(cycle["q05"]) <= truth) & (truth <= np.asarray(cycle["q95"]))
    assert np.mean(covered) >= 0.75, (cycle, truth)
    assert np.abs(np.asarray(cycle["mean"]) - truth).max() < 1.0, (cycle, truth)


def test_subgroup_scores_cover_their_members_true_mean_effect(run):
    programme, records, _, posterior_topic, subgroup_topic = run
    final = max(
        (json.loads(r.value) for r in records if r.topic == posterior_topic),
        key=lambda p: p["version"],
    )
    scores = {
        v["subgroup"]: v
        for v in (json.loads(r.value) for r in records if r.topic == subgroup_topic)
        if v["population_version"] == final["version"]
    }
    truth = programme.truth.patients
    for name, level in (("group-a", "A"), ("group-b", "B")):
        members = [p for p in truth.values() if p.covariates["group"] == level]
        score = scores[name]
        assert score["members"] == len(members)
        true_mean = np.mean([p.effect[MEASURE] for p in members])
        assert score["effect"]["lower"] <= true_mean <= score["effect"]["upper"], score
    assert scores["group-b"]["call"] == "works"
