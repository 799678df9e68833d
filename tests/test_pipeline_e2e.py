"""The living pipeline end to end on the real broker: a simulated programme in,
efficacy scores, posteriors and dead letters out (issues 4 and 19).

One worker subprocess; 200 patients in 20 cohorts, crossover design (the
withdrawal period must count as unexposed), 2% bad records and 2% duplicates.
The programme is designed so that both calls are expected: the population
benefit is 0.5 MCID and the patient effect sd 1.2 MCID (resting heart rate,
MCID 3 bpm), so about a third of the patients truly benefit by less than 0 and a
third by at least the MCID (asserted on the simulation's truth).

The run is read until it has *settled* (tests/settling.py): the last
population posterior covers every valid reading, every patient's latest score
counts all of its readings and was computed under the last posterior (exactly,
or, when the worker's contract lets it keep an older score, within the
materiality thresholds of the score recomputed under the last posterior).
Checked against the simulation's ground truth and an independent fit:

- every bad record and every duplicate is on the dead-letter topic with its
  expected reason, and accepted + dead-lettered = produced;
- the patients' statistics (read back from the table's changelog topic) equal
  the batch computation over the unique valid events with the simulated
  exposure;
- the latest streamed score of every patient agrees with numpyro NUTS on the
  full, non-collapsed model (model.reference) fitted to the same unique valid
  events: mean error and sd ratio (tolerances argued at the test);
- both calls appear, and the called responders / non-responders are truly
  above / below the MCID as often as the independent posterior expects.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from settling import Settling, latest_by_key

from cli.kafka_io import read_to_end, read_until
from cli.programme import build_programme
from cli.simulate import publish
from cli.worker_process import WorkerProcess
from model.events import Events
from model.evidence import stacked
from model.reference import fit_nuts
from streams.app import measure_models
from streams.catalogue import Catalogue
from streams.patient_state import PatientRecord, days
from streams.settings import Settings

pytestmark = pytest.mark.kafka
MEASURE = "resting_heart_rate"
MCID = 3.0  # bpm, measures.toml; lower is better
POPULATION_BENEFIT_MCID = 0.5
EFFECT_SD_MCID = 1.2
NUTS_CHAINS, NUTS_WARMUP, NUTS_SAMPLES = 2, 400, 600


def e2e_programme():
    return build_programme(
        [MEASURE], num_patients=200, num_cohorts=20, obs_per_patient=30, design="crossover",
        seed=11, bad_fraction=0.02, duplicate_fraction=0.02,
        spec_overrides={MEASURE: {"effect": -POPULATION_BENEFIT_MCID * MCID,
                                  "effect_sd": EFFECT_SD_MCID * MCID}},
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(kafka_bootstrap, tmp_path_factory):
    run_id = uuid.uuid4().hex[:8]
    prefix = f"e2e-{run_id}."
    env = {
        "EFFICACY_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EFFICACY_TOPIC_PREFIX": prefix,
        "EFFICACY_APP_ID": f"e2e-{run_id}",
        "EFFICACY_PARTITIONS": "4",
        "EFFICACY_WEB_ENABLED": "false",
        "EFFICACY_METRICS_PORT": "0",
        "EFFICACY_DATA_DIR": str(tmp_path_factory.mktemp("faust")),
    }
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, partitions=4, app_id=env["EFFICACY_APP_ID"]
    )  # fmt: skip
    programme = e2e_programme()
    truth = programme.truth
    expected_letters = len(truth.bad_records) + len(truth.duplicates)
    settling = Settling(programme, prefix, MEASURE)

    started = time.monotonic()
    with WorkerProcess(env) as worker:
        asyncio.run(publish(programme, settings))
        records = asyncio.run(
            read_until(
                kafka_bootstrap,
                [prefix + t for t in ("population-posterior", "scores")],
                done=settling,
                timeout=600,
            )
        )
        settled_after = time.monotonic() - started
        assert worker.alive(), worker.log_tail()
        letters = asyncio.run(
            read_until(
                kafka_bootstrap,
                [prefix + "deadletter"],
                done=lambda rs: len(rs) >= expected_letters,
                timeout=60,
            )
        )
        changelog = asyncio.run(
            read_to_end(kafka_bootstrap, f"{env['EFFICACY_APP_ID']}-patients-changelog")
        )
        log = worker.log_tail(60)
        assert worker.stop() == 0, log
    assert settling.final_posterior(records) is not None, log
    final = settling.final_posterior(records)
    print(f"read {settled_after:.1f} s after the worker started (final posterior "
          f"v{final and final['version']}); stopped on quiet: {settling.gave_up}")  # fmt: skip
    return programme, prefix, records, letters, changelog, settling


def test_every_latest_score_counts_all_readings_under_the_last_posterior(run):
    """Settled (tests/settling.py): the last posterior covers every valid
    reading; every patient's latest score counts all its readings and was
    computed under the last posterior (or, where the worker's contract lets an
    unchanged score stand, is within the materiality thresholds of the score
    recomputed under it, and not older than the last version that asked for
    every score to be republished)."""
    _, _, records, _, _, settling = run
    problems = settling.problems(records)
    assert not problems, f"{len(problems)} problems, e.g. {problems[:5]}"


def test_every_bad_record_and_duplicate_is_dead_lettered_with_its_reason(run):
    programme, prefix, _, letters, _, _ = run
    truth = programme.truth
    by_origin = {(r.value and json.loads(r.value)["source_topic"], json.loads(r.value)["offset"],
                  json.loads(r.value)["partition"]): json.loads(r.value) for r in letters}  # fmt: skip
    reasons = Counter(letter["reason"] for letter in by_origin.values())
    expected = Counter(b.reason for b in truth.bad_records)
    expected["duplicate"] += len(truth.duplicates)
    assert reasons == expected
    # accepted + dead-lettered = produced (unique records by origin)
    produced = sum(sent.records for sent in truth.sent.values())
    accepted = truth.enrollment_events + truth.valid_unique_readings
    assert accepted + len(by_origin) == produced
    # a dead letter carries the raw record's bytes and where they came from
    sent_values = {r.value for records in programme.records.values() for r in records}
    duplicate_ids = {d.event_id for d in truth.duplicates}
    for letter in by_origin.values():
        assert letter["source_topic"].startswith(prefix)
        value = base64.b64decode(letter["value_b64"])
        assert value in sent_values
        if letter["reason"] == "duplicate":
            assert json.loads(value)["event_id"] in duplicate_ids


def test_statistics_equal_the_batch_computation_over_unique_events(run):
    """Duplicates did not count twice and the crossover withdrawal counted as
    unexposed: the table's state equals the batch over unique valid readings."""
    programme, _, _, _, changelog, _ = run
    models = measure_models(Catalogue.load(), Settings())
    state = {
        json.loads(k): PatientRecord.model_validate_json(r.value)  # faust JSON-encodes keys
        for k, r in latest_by_key(changelog).items()
    }
    patients = sorted(programme.truth.patients)
    assert set(state) == set(patients), sorted(state)[:5]
    expected = programme.expected_statistics(MEASURE, models[MEASURE], patients)
    gram = stacked([state[p].measures[MEASURE].gram for p in patients], expected.gram.shape[1:])
    np.testing.assert_allclose(gram, expected.gram, rtol=1e-9, atol=1e-8)
    unexposed = np.array([state[p].measures[MEASURE].count_unexposed for p in patients])
    np.testing.assert_array_equal(unexposed, expected.count_unexposed)


@pytest.fixture(scope="module")
def reference():
    """NUTS on the full non-collapsed model (model.reference.fit_nuts) fitted to
    the programme's unique valid readings with the simulated exposure and the
    worker's ModelConfig (same standardisation, priors and structure), built
    from the programme, not from anything the worker produced. Returns the
    patients (sorted), the draws of each patient's effect by chain (C, N, P),
    the fit and its seconds."""
    programme = e2e_programme()
    truth = programme.truth
    patients = sorted(truth.patients)
    index = {p: i for i, p in enumerate(patients)}
    cohorts = sorted({truth.patients[p].cohort for p in patients})
    topic = truth.measures[MEASURE].source_topic
    valid = [r for r in programme.records[topic] if r.label == "valid" and r.measure == MEASURE]
    events = Events(
        patient=np.array([index[r.patient_id] for r in valid]),
        cohort_of_patient=np.array([cohorts.index(truth.patients[p].cohort) for p in patients]),
        time=np.array([days(r.event_time) for r in valid]),
        exposure=np.array([r.exposure for r in valid]),
        outcome=np.array([r.canonical_value for r in valid]),
    )
    config = measure_models(Catalogue.load(), Settings())[MEASURE]
    started = time.monotonic()
    fit = fit_nuts(events, config, num_warmup=NUTS_WARMUP, num_samples=NUTS_SAMPLES,
                   num_chains=NUTS_CHAINS, seed=3)  # fmt: skip
    seconds = time.monotonic() - started
    # get_samples() concatenates the chains in order
    by_chain = fit.patient_effect.reshape(NUTS_CHAINS, NUTS_SAMPLES, len(patients))
    print(f"NUTS: {NUTS_CHAINS} chains x ({NUTS_WARMUP} + {NUTS_SAMPLES}) in {seconds:.1f} s; "
          f"{fit.diagnostics}")  # fmt: skip
    return patients, by_chain, fit


def test_streamed_scores_match_an_independent_nuts_fit(run, reference):
    """The latest streamed score of every patient against NUTS on the same
    unique valid events.

    NUTS is checked first: 2 chains, no divergence, split R-hat < 1.01 and bulk
    ESS ≥ 400 for every patient effect: what is compared, and the only Monte
    Carlo error of NUTS that enters the comparison (the hyperparameters' R-hat
    and ESS are printed; with 20 cohorts of 10 patients the non-centred cohort
    level mixes well: no divergences, where 5 cohorts of 40 gave some). Then, per patient, z = |streamed mean − NUTS mean| / NUTS sd and the
    sd ratio streamed / NUTS:

    - median z ≤ 0.10 and median sd ratio in 0.9-1.1 (issue 19; DESIGN.md's
      measurement of the collapsed method against NUTS);
    - 90th percentile of z ≤ 0.10 + 1.645 √(1/ESS_min + 1/S). The 0.10 is the
      systematic part allowed for the median (q(θ) from SVI is not the exact
      posterior of θ, and the last warm update stops on an ELBO plateau with SGD
      noise); on top of it each patient's comparison has independent Monte
      Carlo error: the NUTS mean's sd is sd/√ESS, and the streamed mean is a
      mixture over S fixed draws of θ (streams.scoring: the posterior message's
      draws, S = 400), whose mean's Monte Carlo sd is √(Var_s(m_s)/S) ≤
      sd/√S since the between-draw variance is part of the total variance.
      With those errors ~ normal, 1.645 of their combined sd bounds the 90th
      percentile of the noise part.

    A wrong pooling moves far more than that: per-patient OLS without pooling
    (shrinkage ≈ 0.14 here) or the prior's precision counted twice (shrinkage
    ≈ 0.25) put median z near 0.2-0.4 (tests/mutations/ and the report)."""
    _, prefix, records, _, _, _ = run
    patients, by_chain, fit = reference
    assert fit.diagnostics["divergences"] == 0, fit.diagnostics
    ess = effective_sample_size(by_chain)
    r_hat = split_gelman_rubin(by_chain)
    hyper = {name: draws.reshape(NUTS_CHAINS, NUTS_SAMPLES)[..., None]
             for name, draws in fit.population.items()}  # fmt: skip
    print(f"NUTS patient effects: bulk ESS min {ess.min():.0f} (median {np.median(ess):.0f}), "
          f"R-hat max {r_hat.max():.4f}; hyperparameters (ESS, R-hat): "
          + ", ".join(f"{n} ({effective_sample_size(d)[0]:.0f}, {split_gelman_rubin(d)[0]:.3f})"
                      for n, d in hyper.items()))  # fmt: skip
    assert r_hat.max() < 1.01 and ess.min() >= 400
    draws = by_chain.reshape(-1, len(patients))
    nuts_mean, nuts_sd = draws.mean(axis=0), draws.std(axis=0, ddof=1)

    scores = {k.decode(): json.loads(r.value)
              for k, r in latest_by_key(r for r in records if r.topic == prefix + "scores").items()}  # fmt: skip
    assert set(scores) == set(patients)
    streamed = [scores[p]["measures"][0]["effect"] for p in patients]
    mean = np.array([e["mean"] for e in streamed])
    sd = np.array([e["sd"] for e in streamed])
    posterior = max((json.loads(r.value) for r in records if r.topic == prefix + "population-posterior"),
                    key=lambda m: m["version"])  # fmt: skip
    num_draws = len(posterior["draws"]["mu"])
    z = np.abs(mean - nuts_mean) / nuts_sd
    ratio = sd / nuts_sd
    p90_bound = 0.10 + 1.645 * np.sqrt(1.0 / ess.min() + 1.0 / num_draws)
    worst = np.argsort(z)[-3:][::-1]
    print(f"streamed vs NUTS over {len(patients)} patients: median z {np.median(z):.3f}, "
          f"p90 {np.quantile(z, 0.9):.3f} (bound {p90_bound:.3f}), max {z.max():.3f}; "
          f"sd ratio median {np.median(ratio):.3f} (5-95%: {np.quantile(ratio, 0.05):.3f}-"
          f"{np.quantile(ratio, 0.95):.3f}); S = {num_draws}; worst "
          f"{[(patients[i], round(float(z[i]), 3)) for i in worst]}")  # fmt: skip
    assert np.median(z) <= 0.10, f"median |mean - NUTS| / sd = {np.median(z):.3f}"
    assert 0.9 <= np.median(ratio) <= 1.1, f"median sd ratio {np.median(ratio):.3f}"
    assert np.quantile(z, 0.9) <= p90_bound, f"p90 of z {np.quantile(z, 0.9):.3f} > {p90_bound:.3f}"


def test_both_calls_appear_and_agree_with_the_truth(run, reference):
    """The programme has true responders (benefit ≥ MCID) and true
    non-responders (benefit < 0), and the worker calls both. Called responders
    are truly at or above the MCID, called non-responders truly below it, as
    often as the independent posterior says they should: the count is a sum of
    independent Bernoulli(p_i) with p_i the NUTS posterior probability of the
    patient's true side (the simulation draws the effects from the model, so
    NUTS's probabilities are calibrated), so it must lie within 3 sd
    (√Σ p_i(1 − p_i)) of Σ p_i, and be a majority ("mostly"): ≥ 0.7 of the
    called, the hysteresis floor of the decision rule (a responder stays one
    while P(benefit ≥ MCID) ≥ 0.7, a non-responder while P(benefit > 0) ≤ 0.3,
    so P(benefit < MCID) ≥ 0.7). Also the 90% intervals' coverage of the true
    effects, for the record: binomial sd √(0.9·0.1/200) = 0.021, and the
    patients share θ, which correlates their errors: 0.80-0.97."""
    programme, prefix, records, _, _, _ = run
    patients, by_chain, _ = reference
    truth = programme.truth
    benefit = np.array([-truth.patients[p].effect[MEASURE] for p in patients])  # lower is better
    assert (benefit >= MCID).sum() >= 40 and (benefit < 0).sum() >= 40, "the design's premise"
    draws = -by_chain.reshape(-1, len(patients))
    p_nuts_mcid = (draws >= MCID).mean(axis=0)
    scores = {k.decode(): json.loads(r.value)
              for k, r in latest_by_key(r for r in records if r.topic == prefix + "scores").items()}  # fmt: skip
    measures = [scores[p]["measures"][0] for p in patients]
    calls = np.array([m["classification"] for m in measures])
    print(f"calls {Counter(calls.tolist())}")
    covered = np.mean([m["effect"]["lower"] <= -b <= m["effect"]["upper"]
                       for m, b in zip(measures, benefit, strict=True)])  # fmt: skip
    for call, truly, p_side in (
        ("responder", benefit >= MCID, p_nuts_mcid),
        ("non_responder", benefit < MCID, 1.0 - p_nuts_mcid),
    ):
        called = calls == call
        assert called.sum() >= 10, f"{called.sum()} patients called {call}"
        observed = int(truly[called].sum())
        expected = float(p_side[called].sum())
        sd = float(np.sqrt((p_side[called] * (1 - p_side[called])).sum()))
        print(f"{call}: {called.sum()} called, {observed} truly on that side of the MCID; "
              f"NUTS expects {expected:.1f} ± {sd:.1f}")  # fmt: skip
        # + 0.5: an integer count against a real-valued expectation
        assert abs(observed - expected) <= 3 * sd + 0.5, (call, observed, expected, sd)
        assert observed >= 0.7 * called.sum(), (call, observed, called.sum())
    for m in measures:
        if m["classification"] == "non_responder":
            assert m["recommended_action"]
    print(f"90% interval coverage {covered:.3f}")
    assert 0.80 <= covered <= 0.97
